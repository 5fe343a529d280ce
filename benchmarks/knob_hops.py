"""How far a config knob travels: the project function calls (frames under steps/ and flows/, traced with
``sys.setprofile``) from where the YAML mapping enters the config loader to the typed value, and from the step
library function handed the typed config to the code that uses the value.

Knobs: ``preference.criterion_config.beta`` (typed by the converter; read in ``DPOLoss.compute``),
``data.dev_fraction`` (read in ``steps.data.splits.dev_tree_count``) and ``evaluation.max_new_tokens`` (read by the
decoder). Typing is traced from ``plan_run`` (the start step's library call; also ``load_plan``); uses from the step
library calls (``train_variant``, ``prepare_data``, ``reference_outputs``). A hop is one call: a chain of n frames
is n - 1 hops. Runs a tiny model on CPU (about a minute): ``python -m benchmarks.knob_hops [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

import steps

ROOT = Path(steps.__file__).resolve().parents[1]
PROJECT_DIRS = tuple(str(ROOT / name) + os.sep for name in ("steps", "flows"))

CONFIG = """
name: hops
data: {input: embedded, max_trees: 14, dev_fraction: 0.2}
model: {base: tiny, dtype: float32}
sft: {enabled: false}
preference:
  criterion: dpo
  criterion_config: {beta: 0.37}
  init: base
  lr: 1.0e-3
  max_num_tokens: 1024
  max_seq_len: 256
  overlength: truncate
  max_steps: 1
  max_examples: 4
  per_loss:
    orpo: {lr: 2.0e-3}
evaluation: {max_instructions: 1, max_new_tokens: 3, judge_model: tiny, heldout_preference: false}
resources: {output_dir: OUTPUT_DIR}
"""


def _where(frame: FrameType) -> str:
    code = frame.f_code
    module = Path(code.co_filename).resolve().relative_to(ROOT).with_suffix("")
    return f"{'.'.join(module.parts)}:{code.co_qualname}"


def _is_project(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(PROJECT_DIRS)


@dataclass
class Target:
    """A knob's arrival: ``match(frame)`` is true for the call that makes (or reads) the value."""

    label: str
    match: Callable[[FrameType], bool]
    chains: list[list[str]] = field(default_factory=list)


def converted(key_suffix: str) -> Callable[[FrameType], bool]:
    """The converter typing a YAML value whose dotted key ends with ``key_suffix`` (as a float or int)."""

    def match(frame: FrameType) -> bool:
        key = frame.f_locals.get("key")
        return (
            frame.f_code.co_name == "convert_value"
            and isinstance(key, str)
            and (key == key_suffix or key.endswith("." + key_suffix))
            and frame.f_locals.get("tp") in (float, int)
        )

    return match


def called(*qualnames: str) -> Callable[[FrameType], bool]:
    return lambda frame: frame.f_code.co_qualname in qualnames and _is_project(frame)


@contextmanager
def tracing(entry: str, targets: list[Target]) -> Iterator[None]:
    """Record, for every call a target matches, the project frames from the outermost ``entry`` call to it."""

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not _is_project(frame):
            return
        for target in targets:
            if target.match(frame):
                chain: list[str] = []
                f: FrameType | None = frame
                while f is not None:
                    if _is_project(f):
                        chain.append(_where(f))
                        if f.f_code.co_qualname == entry:
                            target.chains.append(chain[::-1])
                            break
                    f = f.f_back

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(None)


def hops_from(chain: list[str], name: str) -> int | None:
    """Calls from the frame ``name`` (a qualname) to the end of ``chain``; None when it is not in the chain."""
    for i, where in enumerate(chain):
        if where.endswith(":" + name):
            return len(chain) - 1 - i
    return None


def _report(title: str, target: Target, also: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"knob": title, "target": target.label, "times": len(target.chains)}
    if target.chains:
        chain = target.chains[0]
        out["chain"] = chain
        out["hops"] = len(chain) - 1
        out["hops_from"] = {name: hops_from(chain, name) for name in also if hops_from(chain, name) is not None}
    return out


def measure(workdir: Path) -> list[dict[str, Any]]:
    from steps.pipeline import plan_run, prepare_data, reference_outputs, step_context, train_variant

    text = CONFIG.replace("OUTPUT_DIR", str(workdir / "runs"))
    mapping = json.loads(json.dumps(yaml.safe_load(text)))  # as Metaflow hands a Config value to start
    typed = {
        "beta": Target("typed float (convert_value)", converted("criterion_config.beta")),
        "dev_fraction": Target("typed float (convert_value)", converted("data.dev_fraction")),
        "max_new_tokens": Target("typed int (convert_value)", converted("evaluation.max_new_tokens")),
    }
    with tracing("plan_run", list(typed.values())):
        plan, output_root = plan_run(mapping, "dpo", "", "", "KnobHops", "1")
    results = [
        _report(f"{name}: YAML mapping -> typed value", target, ("plan_run", "load_plan", "config_from_dict"))
        for name, target in typed.items()
    ]
    (dpo,) = [v for v in plan.variants if v.loss == "dpo"]
    dpo = pickle.loads(pickle.dumps(dpo))  # the artifact start hands the preference step

    dev = Target("steps.data.splits.dev_tree_count", called("dev_tree_count"))
    with tracing("prepare_data", [dev]):
        data_dir, _ = prepare_data(step_context(plan.config, output_root))
    results.append(_report("dev_fraction: typed config -> use", dev, ("prepare_data",)))

    beta = Target("DPOLoss.compute", called("DPOLoss.compute"))
    with tracing("train_variant", [beta]):
        train_variant(step_context(dpo.config, output_root), dpo, data_dir, None)
    results.append(_report("beta: typed config -> use", beta, ("train_variant", "run_preference")))

    new_tokens = Target("the decoder reading max_new_tokens", called("ContinuousBatchDecoder.run", "_generate_static"))
    with tracing("reference_outputs", [new_tokens]):
        reference_outputs(step_context(plan.config, output_root))
    results.append(_report("max_new_tokens: typed config -> use", new_tokens, ("reference_outputs",)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.knob_hops", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="knob-hops-") as tmp:
        results = measure(Path(tmp))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"code: {ROOT}")
    for r in results:
        extra = ", ".join(f"{h} from {n}" for n, h in r.get("hops_from", {}).items())
        print(f"\n{r['knob']} [{r['target']}]: {r.get('hops', 'not reached')} hops ({extra}); typed/read {r['times']}x")
        for i, where in enumerate(r.get("chain", [])):
            print(f"  {i:2d} {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
