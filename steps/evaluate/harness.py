"""The alignment tax: lm-evaluation-harness tasks (ifeval, mmlu, gsm8k, arc_challenge, ... or a local YAML task)
run on one model with the dtype, device and sampling settings of its AlpacaEval answers.

``run_benchmarks`` checks every task (name, cached data, NLTK data) before it loads the model, runs each task with
``lm_eval.simple_evaluate`` on one PrefFlow-loaded model, writes lm_eval's raw results, the per-document samples
and a summary atomically into the evaluation directory, and returns the summary: per benchmark the headline metric
with its standard error and what makes it reproducible. lm_eval is the optional ``benchmarks`` extra.

CLI (``python -m steps.evaluate.harness``): ``fetch TASK...`` downloads the tasks' data while online (run it once
before going offline); ``run MODEL --benchmarks ifeval,mmlu:5 --out DIR`` evaluates a model directory or spec.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.evaluate.benchmark_specs import BenchmarkSpec, parse_benchmarks
from steps.evaluate.generation import ModelRun, resolve_device
from steps.evaluate.harness_results import compact_samples, format_score, summarize_benchmark
from steps.evaluate.settings import GenerationSettings
from steps.io import atomic_write_files, jsonl_line

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

logger = logging.getLogger(__name__)

RESULTS_FILE = "lm_eval_results.json"
SAMPLES_FILE = "lm_eval_samples.jsonl"
SUMMARY_FILE = "benchmarks.json"
INSTALL_HINT = "pip install -e '.[benchmarks]' (lm_eval with its Hugging Face and IFEval dependencies)"
#: lm_eval's own seeds for Python's and numpy's RNGs and the few-shot sampler: kept, so that few-shot examples
#: match published runs. PrefFlow's ``seed`` drives torch's RNG, i.e. sampling.
LM_EVAL_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "fewshot_random_seed": 1234}
#: lm_eval's default; means (acc, exact_match) get the closed-form standard error, not a bootstrap.
BOOTSTRAP_ITERS = 100000
#: NLTK data that tasks load at scoring time (after all generation), by a part of the task name: checked before the
#: model loads. IFEval's verifiers (ifeval, leaderboard_ifeval, ...) split sentences with punkt_tab.
NLTK_DATA = {"ifeval": ("tokenizers/punkt_tab", "punkt_tab")}


def nltk_needs(leaf_names: Iterable[str]) -> set[tuple[str, str]]:
    """(resource, package) pairs of NLTK data that ``leaf_names`` score with."""
    return {need for name in leaf_names for part, need in NLTK_DATA.items() if part in name}


class HarnessUnavailableError(RuntimeError):
    """lm_eval is not installed."""


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run: unknown task, data not cached offline, missing NLTK data, a bad task_dir."""


def require_lm_eval() -> str:
    """lm_eval's version, or HarnessUnavailableError saying how to install it."""
    if importlib.util.find_spec("lm_eval") is None:
        raise HarnessUnavailableError(f"evaluation.benchmarks needs lm-evaluation-harness: {INSTALL_HINT}")
    return importlib.metadata.version("lm_eval")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def task_dirs(specs: Sequence[BenchmarkSpec]) -> list[Path]:
    """The specs' ``task_dir`` directories (each once), checked to exist."""
    dirs: list[Path] = []
    for spec in specs:
        if spec.task_dir is None:
            continue
        path = Path(spec.task_dir).expanduser().resolve()
        if not path.is_dir():
            raise BenchmarkError(f"benchmark {spec.task!r}: task_dir {spec.task_dir!r} is not a directory")
        if path not in dirs:
            dirs.append(path)
    return dirs


def task_manager(specs: Sequence[BenchmarkSpec]) -> TaskManager:
    """lm_eval's task index over the specs' task directories, plus lm_eval's own ~15k task files unless every
    requested name is local (indexing those takes seconds). Local definitions win on a name clash either way."""
    from lm_eval.tasks import TaskManager

    dirs = task_dirs(specs)
    if dirs:
        local = TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)
        if all(spec.task in local.all_tasks for spec in specs):
            return local
    return TaskManager(include_path=[str(d) for d in dirs] or None)


def _unknown_task(manager: TaskManager, spec: BenchmarkSpec) -> BenchmarkError:
    close = difflib.get_close_matches(spec.task, manager.all_tasks, n=3, cutoff=0.75)
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    where = f" or in task_dir {spec.task_dir!r}" if spec.task_dir else ""
    return BenchmarkError(
        f"benchmark {spec.task!r}: no lm_eval task, group or tag has this name{where}{hint}; "
        "list them with `python -m lm_eval ls tasks`"
    )


def _data_unavailable(spec: BenchmarkSpec, exc: BaseException) -> BenchmarkError:
    state = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub could not be reached"
    return BenchmarkError(
        f"benchmark {spec.task!r}: its data set is not in the local Hugging Face cache and {state} ({exc}). "
        f"Fix: run `python -m steps.evaluate.harness fetch {spec.task}` once with internet access and the same "
        "HF_HOME / HF_DATASETS_CACHE as this run (or pre-download the data set into that cache), then rerun"
    )


def _load_tasks(manager: TaskManager, spec: BenchmarkSpec) -> dict[str, Any]:
    """lm_eval's ``TaskManager.load`` of ``spec.task`` (which loads the data), its failures as BenchmarkError."""
    try:
        return dict(manager.load([spec.task]))
    except KeyError as exc:
        raise _unknown_task(manager, spec) from exc
    except (ConnectionError, TimeoutError) as exc:
        raise _data_unavailable(spec, exc) from exc
    except FileNotFoundError as exc:  # datasets' DatasetNotFoundError, a missing local data file
        if hub_offline():
            raise _data_unavailable(spec, exc) from exc
        raise BenchmarkError(f"benchmark {spec.task!r}: its data could not be found: {exc}") from exc


def load_benchmark(manager: TaskManager, spec: BenchmarkSpec) -> list[Any]:
    """The task objects to evaluate for ``spec`` (its group, or its tasks), with their data loaded: a missing
    name, uncached data or missing NLTK data fails here, before any model is loaded."""
    loaded = _load_tasks(manager, spec)
    check_nltk_data(spec, list(loaded["tasks"]))
    groups = loaded.get("groups", {})
    return [groups[spec.task]] if spec.task in groups else list(loaded["tasks"].values())


def check_nltk_data(spec: BenchmarkSpec, leaf_names: Iterable[str]) -> None:
    """Scoring-time NLTK data (IFEval's sentence splitter) present, else BenchmarkError saying how to get it."""
    needed = nltk_needs(leaf_names)
    if not needed:
        return
    import nltk

    for resource, package in sorted(needed):
        try:
            nltk.data.find(resource)
        except LookupError as exc:
            raise BenchmarkError(
                f"benchmark {spec.task!r} scores with NLTK's {package!r} data, which is not installed; run "
                f"`python -m nltk.downloader {package}` once with internet access (or set NLTK_DATA to a folder "
                "holding it)"
            ) from exc


def stop_strings(model: Any, tokenizer: Any) -> list[str]:
    """The texts of the tokens PrefFlow's generation stops on (end of turn, eos), as lm_eval ``until`` entries."""
    from steps.chat import stop_token_ids

    ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    return [text for text in (tokenizer.decode([i], skip_special_tokens=False) for i in ids) if text]


def run_generation_kwargs(task_kwargs: dict[str, Any], generation: GenerationSettings, stops: Sequence[str]) -> dict:
    """A generating task's ``generation_kwargs`` with PrefFlow's sampling: temperature (0 = greedy), top_p,
    max_new_tokens; the task's stop sequences kept and PrefFlow's stop tokens added."""
    out = {k: v for k, v in task_kwargs.items() if k not in ("max_new_tokens", "max_tokens", "max_completion_tokens")}
    until = out.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    out["until"] = until + [s for s in stops if s not in until]
    out["do_sample"] = generation.do_sample
    out["temperature"] = float(generation.temperature)
    out["max_gen_toks"] = generation.max_new_tokens
    if generation.do_sample:
        out["top_p"] = float(generation.top_p)
    else:
        out.pop("top_p", None)
    return out


def apply_generation(
    spec: BenchmarkSpec, top: Sequence[Any], generation: GenerationSettings, stops: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Set each generating leaf task's sampling per ``spec.generation``; returns what each one will use."""
    from lm_eval.api.group import Group

    leaves = [t for item in top for t in (item.get_all_tasks() if isinstance(item, Group) else [item])]
    used: dict[str, dict[str, Any]] = {}
    for task in leaves:
        if task.get_config("output_type") != "generate_until":
            continue
        kwargs = dict(task.get_config("generation_kwargs") or {})
        if spec.generation == "run":
            kwargs = run_generation_kwargs(kwargs, generation, stops)
            task.set_config(key="generation_kwargs", value=kwargs, update=False)
        used[task.task_name] = kwargs
    return used


@dataclass(frozen=True)
class LoadedModel:
    """The model every benchmark runs on, and how it was loaded (for the summary)."""

    model: Any
    tokenizer: Any
    device: str
    dtype: str


def load_for_benchmarks(model_spec: str, run: ModelRun) -> LoadedModel:
    """``run.model``/``run.tokenizer`` when given, else ``model_spec`` loaded in ``run.dtype`` on ``run.device``
    (``auto``: a GPU when present; dtype ``auto``: bf16 on a GPU that has it, else fp32), as for AlpacaEval."""
    from steps.models import load_model, load_tokenizer

    device = resolve_device(run.device)
    model = run.model if run.model is not None else load_model(model_spec, dtype=run.dtype, device=device)
    tokenizer = run.tokenizer if run.tokenizer is not None else load_tokenizer(model_spec)
    parameter = next(model.parameters())
    return LoadedModel(model, tokenizer, str(parameter.device), str(parameter.dtype).removeprefix("torch."))


def _chat_template_sha(tokenizer: Any) -> str | None:
    import hashlib

    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode("utf-8")).hexdigest() if isinstance(template, str) else None


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def _evaluate_one(lm: Any, manager: TaskManager, spec: BenchmarkSpec, top: list[Any], torch_seed: int) -> dict:
    """One spec through ``simple_evaluate`` (its own n-shot and limit); lm_eval's results dict, samples included."""
    from lm_eval import simple_evaluate

    raw = simple_evaluate(
        model=lm,
        tasks=top,
        task_manager=manager,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        apply_chat_template=spec.chat_template,
        log_samples=True,
        bootstrap_iters=BOOTSTRAP_ITERS,
        torch_random_seed=torch_seed,
        **LM_EVAL_SEEDS,
    )
    if raw is None:
        raise BenchmarkError(f"benchmark {spec.task!r}: lm_eval returned no results (not rank 0?)")
    return dict(raw)


def run_benchmarks(
    model_spec: str,
    benchmarks: Sequence[Any],
    generation: GenerationSettings,
    out_dir: str | os.PathLike,
    run: ModelRun = ModelRun(),
) -> dict[str, Any]:
    """Run ``benchmarks`` (``BenchmarkSpec``s, or config entries: names and mappings) on ``model_spec`` and write
    ``lm_eval_results.json`` (lm_eval's raw results per task), ``lm_eval_samples.jsonl`` and ``benchmarks.json``
    (the returned summary) into ``out_dir``. ``run`` gives device, dtype and optionally the loaded model/tokenizer;
    ``generation`` the sampling of generating tasks (and ``batch_size``)."""
    version = require_lm_eval()
    specs = parse_benchmarks(benchmarks)
    if not specs:
        raise BenchmarkError("no benchmarks listed")
    started = time.monotonic()
    manager = task_manager(specs)
    tasks = {spec.task: load_benchmark(manager, spec) for spec in specs}
    logger.info("benchmarks ready (%s) in %.1f s", ", ".join(tasks), time.monotonic() - started)
    loaded = load_for_benchmarks(model_spec, run)
    from steps.evaluate.harness_lm import PrefflowLM

    lm = PrefflowLM(loaded.model, loaded.tokenizer, batch_size=generation.batch_size)
    stops = stop_strings(loaded.model, loaded.tokenizer)
    raw_results: dict[str, Any] = {}
    sample_rows: list[dict[str, Any]] = []
    entries: dict[str, Any] = {}
    for spec in specs:
        task_started = time.monotonic()
        used = apply_generation(spec, tasks[spec.task], generation, stops)
        raw = _evaluate_one(lm, manager, spec, tasks[spec.task], generation.seed)
        samples = raw.pop("samples", {}) or {}
        entries[spec.task] = {
            **summarize_benchmark(spec, raw, samples, used),
            "seconds": round(time.monotonic() - task_started, 2),
        }
        raw_results[spec.task] = raw
        sample_rows.extend(row for name, rows in samples.items() for row in compact_samples(spec.task, name, rows))
        logger.info("benchmark %s: %s %s", spec.task, entries[spec.task]["metric"], format_score(entries[spec.task]))
    summary = {
        "model": model_spec,
        "lm_eval_version": version,
        "backend": "hf",
        "device": loaded.device,
        "dtype": loaded.dtype,
        "batch_size": generation.batch_size,
        "generation": generation.record(),
        "stop_strings": stops,
        "chat_template_sha256": _chat_template_sha(loaded.tokenizer),
        "seeds": {**LM_EVAL_SEEDS, "torch_random_seed": generation.seed},
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "seconds": round(time.monotonic() - started, 2),
        "benchmarks": entries,
        "files": {"results": RESULTS_FILE, "samples": SAMPLES_FILE, "summary": SUMMARY_FILE},
    }
    out = Path(out_dir)
    atomic_write_files(  # staged together: a failure leaves none of the three replaced
        {
            out / RESULTS_FILE: _json_bytes(raw_results),
            out / SAMPLES_FILE: b"".join(jsonl_line(row) for row in sample_rows),
            out / SUMMARY_FILE: _json_bytes(summary),
        }
    )
    logger.info("wrote %s, %s (%d lines), %s", out / RESULTS_FILE, out / SAMPLES_FILE, len(sample_rows), SUMMARY_FILE)
    return summary


# ----------------------------------------------------------------------------------------------------------- CLI


def fetch_benchmarks(benchmarks: Sequence[Any]) -> list[str]:
    """Download the data (and IFEval's NLTK data) of ``benchmarks`` into the local caches; needs internet."""
    require_lm_eval()
    if hub_offline():
        raise BenchmarkError("fetch needs the Hub: unset HF_HUB_OFFLINE (and run where the internet is reachable)")
    specs = parse_benchmarks(benchmarks)
    manager = task_manager(specs)
    for spec in specs:
        leaves = list(_load_tasks(manager, spec)["tasks"])
        packages = sorted(package for _, package in nltk_needs(leaves))
        if packages:
            import nltk

            for package in packages:
                nltk.download(package)
        check_nltk_data(spec, leaves)
        logger.info("fetched %s (%d tasks)", spec.task, len(leaves))
    return [spec.task for spec in specs]


def parse_cli_benchmarks(args: argparse.Namespace) -> list[BenchmarkSpec]:
    """``--benchmarks ifeval,mmlu:5`` -> specs (``:N`` sets num_fewshot), each with the other flags' settings."""
    specs = []
    for item in (part.strip() for part in args.benchmarks.split(",")):
        if not item:
            continue
        name, _, shots = item.partition(":")
        specs.append(
            BenchmarkSpec(
                task=name,
                num_fewshot=int(shots) if shots else None,
                limit=args.limit,
                chat_template=args.chat_template,
                task_dir=args.task_dir,
            )
        )
    return specs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steps.evaluate.harness", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download benchmark data while online")
    fetch.add_argument("tasks", nargs="+")
    run = sub.add_parser("run", help="run benchmarks on one model")
    run.add_argument("model", help="a model directory or spec (tiny, embedded:..., a Hub id)")
    run.add_argument("--benchmarks", required=True, help="comma-separated tasks, ':N' for N-shot: ifeval,mmlu:5")
    run.add_argument("--out", required=True, help="directory for lm_eval_results.json, samples and benchmarks.json")
    run.add_argument("--limit", type=int, default=None, help="first N documents per task (smoke runs)")
    run.add_argument("--task-dir", default=None, help="directory of local task YAML files")
    run.add_argument(
        "--no-chat-template", dest="chat_template", action="store_false", help="plain prompts, no chat template"
    )
    run.add_argument("--device", default="auto")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    defaults = GenerationSettings()
    for name in ("max_new_tokens", "temperature", "top_p", "seed", "batch_size"):
        default = getattr(defaults, name)
        run.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fetch":
            fetch_benchmarks(args.tasks)
            return 0
        settings = GenerationSettings.from_config(args)
        specs = parse_cli_benchmarks(args)
        summary = run_benchmarks(args.model, specs, settings, args.out, ModelRun(device=args.device, dtype=args.dtype))
    except (HarnessUnavailableError, BenchmarkError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({task: format_score(entry) for task, entry in summary["benchmarks"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
