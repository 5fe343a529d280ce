"""The work behind each step of flows/pipeline.py, as plain functions (testable without Metaflow).

Each function logs what it read and wrote and returns plain dicts/strings that Metaflow stores as
artifacts. Model weights never travel as artifacts: they are directories under the run's output
root whose paths are artifacts (and a retried step resumes from its own last checkpoint there).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from steps.config import (ConfigError, RunConfig, config_from_dict, config_to_dict, load_sweep, parse_losses,
                          parse_overrides, parse_yaml_text, variant)

log = logging.getLogger("prefflow")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)


def _config_source_from_argv() -> str:
    """The config file named on the command line (``--config config FILE``), for error messages."""
    argv = sys.argv
    for i, arg in enumerate(argv[:-2]):
        if arg == "--config" and argv[i + 1] == "config":
            return argv[i + 2]
    return "configs/default.yaml"


def parse_config_text(text: str) -> dict:
    """Metaflow ``Config`` parser: YAML -> validated, normalised dict. Fails the run before any work."""
    source = _config_source_from_argv()
    cfg = config_from_dict(parse_yaml_text(text, source), source)
    return config_to_dict(cfg)


@contextlib.contextmanager
def cpu_heavy_section(cfg: RunConfig, what: str):
    """On a machine without a GPU, let one heavy step (training, generation, judging) run at a time.

    Metaflow runs foreach branches in parallel; on a 2-core laptop two torch processes each wanting
    every core thrash (measured: a 10x slower reference pass). GPU machines and schedulers that give
    each step its own node are unaffected. Turn off with ``resources.serialize_cpu_steps: false``.
    """
    import fcntl
    import time

    import torch

    if torch.cuda.is_available() or not cfg.resources.serialize_cpu_steps:
        yield
        return
    lock_path = Path(cfg.resources.output_dir).resolve() / ".cpu-heavy.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        t0 = time.perf_counter()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: waiting for another CPU-heavy step to finish (%s)", what, lock_path)
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("%s: waited %.0fs", what, time.perf_counter() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_config(raw: dict) -> RunConfig:
    return config_from_dict(raw, raw.get("name", "config"))


def plan_run(raw_config: dict, loss_arg: str, set_arg: str, flow_name: str, run_id: str, sweep_path: str = ""):
    """start: apply overrides, pick losses and sweep points, list the variants to train, fix the output root."""
    _setup_logging()
    overrides = parse_overrides(set_arg)
    cfg = config_from_dict(_plain(raw_config), f"config {raw_config.get('name', '')}".strip(), overrides)
    losses = parse_losses(loss_arg, cfg) if (loss_arg or not sweep_path) else []
    if losses and not cfg.sft.enabled and cfg.preference.init == "sft":
        raise ConfigError("config", "preference.init", "is 'sft' but sft.enabled is false")
    variants = ([variant("sft", "sft")] if cfg.sft.enabled else []) + [variant(name, name) for name in losses]
    if sweep_path:
        variants += load_sweep(sweep_path, cfg)
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError("--sweep", sweep_path, f"variant names collide: {names}")
    if not variants:
        raise ConfigError("--loss", loss_arg, "nothing to train: SFT is disabled and no preference loss was given")
    output_root = str((Path(cfg.resources.output_dir) / flow_name / str(run_id)).resolve())
    log.info("run %s: losses=%s variants=%s output=%s", run_id, losses, variants, output_root)
    return config_to_dict(cfg), losses, variants, output_root


def _plain(obj: Any) -> Any:
    """Metaflow ConfigValue -> plain dicts/lists."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def prepare_data(raw: dict, output_root: str) -> tuple[str, dict]:
    from steps.data.oasst import prepare_oasst

    _setup_logging()
    d = run_config(raw).data
    out = Path(output_root) / "data"
    prepared = prepare_oasst(d.input, out, langs=tuple(d.langs) if d.langs else None, pair_strategy=d.pair_strategy,
                             sft_rank=d.sft_rank, tree_states=tuple(d.tree_states) if d.tree_states else None,
                             include_synthetic=d.include_synthetic, include_deleted=d.include_deleted,
                             require_review=d.require_review, dev_fraction=d.dev_fraction, seed=d.seed,
                             max_trees=d.max_trees, split=d.split)
    log.info("prepared data in %s", out)
    return str(out), prepared.stats


def reference_outputs(raw: dict, output_root: str) -> tuple[dict, Optional[str]]:
    """The eval set plus reference outputs written to a JSON file; (eval set info, path)."""
    _setup_logging()
    cfg = run_config(raw)
    e = cfg.evaluation
    if not e.enabled:
        return {"enabled": False}, None
    from steps.evaluate import load_eval_set, make_judge, reference_outputs_for
    from steps.io import write_json

    make_judge(e.judge, model=e.judge_model, max_chars=e.judge_max_chars).check()  # API keys etc. before generation
    eval_set = load_eval_set(e.eval_set, max_instructions=e.max_instructions)
    with cpu_heavy_section(cfg, "reference outputs"):
        refs = reference_outputs_for(eval_set, cfg.model.base, max_new_tokens=e.max_new_tokens,
                                     temperature=e.temperature, top_p=e.top_p, seed=e.seed, batch_size=e.batch_size)
    path = write_json(Path(output_root) / "eval" / "reference_outputs.json", refs)
    info = {"enabled": True, "name": eval_set.name, "n": len(eval_set.records), "subset": eval_set.subset,
            "reference_generator": refs[0]["generator"] if refs else None}
    log.info("eval set %s (%d instructions), reference %s -> %s", info["name"], info["n"],
             info["reference_generator"], path)
    return info, str(path)


def train_sft(raw: dict, data_dir: str, output_root: str) -> Optional[dict]:
    from steps.train.launch import launch

    _setup_logging()
    cfg = run_config(raw)
    if not cfg.sft.enabled:
        return None
    with cpu_heavy_section(cfg, "sft"):
        return launch(raw, "sft", data_dir, str(Path(output_root) / "sft"),
                      nproc_per_node=cfg.resources.nproc_per_node)


def train_variant(raw: dict, variant: dict, data_dir: str, output_root: str, sft_summary: Optional[dict]) -> dict:
    from steps.train.launch import launch

    _setup_logging()
    if variant["loss"] == "sft":
        return sft_summary
    cfg = config_from_dict(raw, raw.get("name", "config"), variant["overrides"])
    sft_dir = sft_summary["model_dir"] if sft_summary else None
    with cpu_heavy_section(cfg, variant["name"]):
        return launch(config_to_dict(cfg), variant["loss"], data_dir, str(Path(output_root) / variant["name"]),
                      sft_model_dir=sft_dir, nproc_per_node=cfg.resources.nproc_per_node)


def evaluate_variant(raw: dict, variant: dict, train_summary: dict, reference_path: Optional[str],
                     eval_set_info: dict, output_root: str) -> dict:
    _setup_logging()
    cfg = run_config(raw)
    e = cfg.evaluation
    name = variant["name"]
    base = {"variant": name, "loss": variant["loss"], "model_dir": train_summary["model_dir"],
            "init": train_summary["init_label"], "epoch": train_summary["config"].get("epochs")}
    if not e.enabled or reference_path is None:
        return {**base, "evaluated": False}
    with cpu_heavy_section(cfg, f"evaluate {name}"):
        metrics = _evaluate(cfg, e, name, train_summary, reference_path, output_root)
    return {**base, "evaluated": True, **metrics}


def _evaluate(cfg: RunConfig, e, name: str, train_summary: dict, reference_path: str, output_root: str) -> dict:
    from steps.evaluate import evaluate_model, load_eval_set
    from steps.io import read_json

    eval_set = load_eval_set(e.eval_set, max_instructions=e.max_instructions)
    return evaluate_model(
        train_summary["model_dir"], eval_set, read_json(reference_path),
        generator=f"prefflow-{name}-{Path(output_root).name}", judge_name=e.judge, judge_model=e.judge_model,
        judge_kwargs={"max_output_chars": e.judge_max_chars}, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
        top_p=e.top_p, seed=e.seed, batch_size=e.batch_size, lc_assets_dir=e.lc_assets_dir,
        out_dir=Path(output_root) / "eval" / name, cache_dir=Path(output_root).parent / "judge_cache")


def collect_results(results: list[dict], summaries: list[dict]) -> list[dict]:
    rows = []
    for res, summ in zip(results, summaries):
        rows.append({**res, "train_steps": summ["steps"], "train_elapsed_s": summ["elapsed_s"],
                     "final_dev": summ["final_dev"], "training_config": summ["config"]})
    return sorted(rows, key=lambda r: (r["loss"] != "sft", r["variant"]))


def format_results_table(results: list[dict]) -> str:
    head = "| LC WR | WR | Loss Function | Training Config | Epoch | Model Initialization |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in results:
        lc = r.get("length_controlled_winrate")
        wr = r.get("win_rate")
        cfg = r.get("training_config", {})
        knobs = cfg.get("criterion_config") or {}
        knob_text = ", ".join(f"{k}={v}" for k, v in knobs.items() if k != "_type_")
        tc = f"lr={cfg.get('lr')}" + (f", {knob_text}" if knob_text else "")
        lines.append(f"| {_num(lc)} | {_num(wr)} | {r['loss'].upper() if r['loss'] != 'sft' else 'SFT'} | "
                     f"{tc} | {r.get('epoch')} | {r.get('init')} |")
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def print_results(results: list[dict]) -> None:
    print(format_results_table(results))
    for r in results:
        if r.get("evaluated"):
            print(f"{r['variant']}: judge={r.get('judge')} eval_set={r.get('eval_set')} "
                  f"reference={r.get('reference_generator')} lc_method={r.get('lc_method')} n={r.get('n_total')}")
