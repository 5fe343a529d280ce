"""How many times a normal flow run types its config: a real ``flows/pipeline.py run`` (tiny model, SFT and DPO on
2 torchrun ranks, one-instruction evaluation) with a ``sitecustomize`` that counts, in every process (the command
line, each Metaflow task, each rank), the converter building a whole RunConfig, a single section and a loss
config, and the preference section resolved for a loss.

``python -m benchmarks.config_typings`` (a few minutes on 2 cores); nothing in the package changes for it.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import steps

ROOT = Path(steps.__file__).resolve().parents[1]

CONFIG = """
name: typings
data: {input: embedded, max_trees: 14, dev_fraction: 0.2}
model: {base: tiny, dtype: float32}
sft: {lr: 1.0e-3, max_num_tokens: 1024, max_seq_len: 256, overlength: truncate, max_steps: 1}
preference: {criterion: dpo, criterion_config: {beta: 0.1}, lr: 1.0e-3, max_num_tokens: 1024, max_seq_len: 256,
             overlength: truncate, max_steps: 1, per_loss: {orpo: {criterion_config: {orpo_lambda: 0.2}}}}
evaluation: {max_instructions: 1, max_new_tokens: 3, judge_model: tiny, heldout_preference: false}
resources: {output_dir: OUTPUT_DIR, nproc_per_node: 2}
"""

#: Loaded by every Python process of the run (PYTHONPATH): wraps the converter once it is imported.
SITECUSTOMIZE = textwrap.dedent(
    """
    import importlib.abc, importlib.util, os, sys

    LOG = os.environ["TYPINGS_LOG"]

    def role():
        argv = sys.argv
        if "step" in argv:
            return "task " + argv[argv.index("step") + 1]
        if any(a.endswith(os.path.join("steps", "train", "launch.py")) for a in argv):
            kind = argv[argv.index("--kind") + 1] if "--kind" in argv else "?"
            return f"torchrun rank {os.environ.get('RANK', '?')} ({kind})"
        command = next((a for a in argv[1:] if a in ("run", "resume", "card", "dump", "show", "check")), "?")
        return f"metaflow command {command}" + (" (the command line)" if command == "run" else "")

    def record(what):
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()}\\t{role()}\\t{what}\\n")

    def patch(module):
        build = module.build

        def counting_build(cls, *args, **kwargs):
            name = getattr(cls, "__name__", str(cls))
            top = name == "RunConfig"
            record("RunConfig typed" if top else f"{name} built")
            return build(cls, *args, **kwargs)

        module.build = counting_build

    def patch_training(module):
        resolve = module.resolve_preference

        def counting_resolve(*args, **kwargs):
            record("preference resolved for a loss")
            return resolve(*args, **kwargs)

        module.resolve_preference = counting_resolve

    PATCHES = {"steps.config.convert": patch, "steps.config.training": patch_training}

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in PATCHES:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                PATCHES[name](module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())
    """
)


def run_flow(work: Path) -> list[tuple[str, str, str]]:
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    config = work / "typings.yaml"
    config.write_text(CONFIG.replace("OUTPUT_DIR", str(work / "runs")))
    log = work / "typings.log"
    env = {
        **os.environ,
        "USERNAME": os.environ.get("USERNAME", "prefflow"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(work / "mf"),
        "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PREFFLOW_REPORT_DIR": str(work / "reports"),
        "TYPINGS_LOG": str(log),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [sys.executable, str(ROOT / "flows" / "pipeline.py"), "--config", "config", str(config), "run"]
    proc = subprocess.run(cmd + ["--loss", "dpo"], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"the flow failed (exit {proc.returncode})")
    lines = log.read_text().splitlines() if log.exists() else []
    return [tuple(line.split("\t", 2)) for line in lines]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m benchmarks.config_typings", description=__doc__).parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="config-typings-") as tmp:
        events = run_flow(Path(tmp))
    print(f"code: {ROOT}")
    by_role: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for _pid, role, what in events:
        by_role[role][what] += 1
    for role, counts in by_role.items():
        print(f"{role}: " + ", ".join(f"{what} x{n}" for what, n in sorted(counts.items())))
    total = collections.Counter(what for _, _, what in events)
    print("total: " + ", ".join(f"{what} x{n}" for what, n in sorted(total.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
