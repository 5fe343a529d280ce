"""The work behind each step of flows/pipeline.py as plain functions (testable without Metaflow).

Steps take the typed config planned in ``start`` and return plain dicts; model weights travel as directories."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path

from steps.config import EvaluationConfig, RunConfig, RunPlan, VariantPlan, plan_for_start
from steps.config.loading import METAFLOW_SOURCE
from steps.locks import file_lock
from steps.model_store import ModelStore, open_store
from steps.model_store import handoff_location as _handoff_location
from steps.report.table import run_results_table
from steps.train.gang import Gang, current_gang, gang_summary

__all__ = ["current_gang", "gang_summary"]  # the flow's gang steps call them from here

logger = logging.getLogger(__name__)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)


def device_lock_path() -> Path:
    """The machine-wide lock GPU steps take turns on: per user and per visible GPU set (``PREFFLOW_DEVICE_LOCK``
    names another file)."""
    override = os.environ.get("PREFFLOW_DEVICE_LOCK")
    if override:
        return Path(override)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "_") or "none"
    return Path(tempfile.gettempdir()) / f"prefflow-gpu-{os.getuid()}-{visible}.lock"


@contextlib.contextmanager
def cpu_heavy_section(cfg: RunConfig, what: str, *, gpu: bool | None = None) -> Iterator[None]:
    """Let one heavy step (training, generation, judging) of a local run use the machine's compute at a time.

    Metaflow runs foreach branches in parallel. Without a GPU two torch processes each wanting every core thrash
    (measured: a 10x slower reference pass): they take turns on ``output_dir/.cpu-heavy.lock``
    (``resources.serialize_cpu_steps``). With GPUs, steps would start on the same GPUs at once: they take turns
    on a machine-wide lock (:func:`device_lock_path`, ``resources.serialize_gpu_steps``), except on Kubernetes,
    where each step gets its own node. ``gpu``: None = whether CUDA is available here.
    """
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if gpu:
        if cfg.resources.kubernetes or not cfg.resources.serialize_gpu_steps:
            yield
            return
        lock = device_lock_path()
    else:
        if not cfg.resources.serialize_cpu_steps:
            yield
            return
        lock = Path(cfg.resources.output_dir).resolve() / ".cpu-heavy.lock"
    with file_lock(lock, what):
        yield


def plan_run(
    config: Mapping, loss_arg: str, set_arg: str, sweep_path: str, flow_name: str, run_id: str
) -> tuple[RunPlan, str]:
    """start: the typed config (``--set`` applied), the losses and one resolved config per variant; the output root."""
    _setup_logging()
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # Metaflow's ConfigValue
    plan = plan_for_start(data, METAFLOW_SOURCE, set_arg, loss_arg, sweep_path)
    check_output_locations(plan.config)
    hub = plan.config.push_to_hub
    if hub.repo_id is not None:  # a missing token or clashing repo ids fail now, not after hours of training
        from steps.hub import check_publish

        names = [v.name for v in plan.variants if hub.variants is None or v.name in hub.variants]
        check_publish(hub.repo_id, names, dry_run=hub.dry_run)
    output_root = str((Path(plan.config.resources.output_dir) / flow_name / str(run_id)).resolve())
    logger.info(
        "run %s: losses=%s variants=%s output=%s", run_id, plan.losses, [v.name for v in plan.variants], output_root
    )
    return plan, output_root


def handoff_location(cfg: RunConfig, output_root: str, flow_name: str, ds_type: str, ds_root: str) -> dict | None:
    """start: where this run hands files between steps (None: ``resources.model_store`` resolves to shared)."""
    return _handoff_location(cfg.resources.handoff(), output_root, flow_name, ds_type, ds_root)


def begin_step(handoff: dict | None, output_root: str, gang: Gang | None = None) -> ModelStore | None:
    """Every step's first call: logging, and the run's store (None: shared filesystem; see model_store.open_store)."""
    _setup_logging()
    return open_store(handoff, output_root, gang.node_index if gang else 0)


#: The report directory holds a few small files: it needs far less room than the output root.
REPORT_MIN_FREE_BYTES = 16 << 20


def check_output_locations(cfg: RunConfig) -> None:
    """start, before any work: ``resources.output_dir`` and the report directory exist (or can be created), take a
    file, and have free space (``$PREFFLOW_MIN_FREE_MB``, default 1024 MiB, for the output dir; 16 MiB for the
    report); else one clear :class:`steps.io.OutputLocationError` and nothing written, earlier outputs untouched."""
    from steps.io import check_output_location
    from steps.report.generate import REPORT_DIR_ENV, default_report_dir

    check_output_location(cfg.resources.output_dir, "resources.output_dir")
    where = f"the report directory (${REPORT_DIR_ENV}, else ./reports)"
    check_output_location(default_report_dir(), where, min_free=REPORT_MIN_FREE_BYTES)


def prepare_data(cfg: RunConfig, output_root: str, handoff: dict | None = None) -> tuple[str, dict]:
    """The data section's input, in its format, -> SFT examples and preference pairs under the run's data dir."""
    from steps.data import prepare_data as prepare

    store = begin_step(handoff, output_root)
    out = Path(output_root) / "data"
    prepared = prepare(cfg.data, out)
    logger.info("prepared %s data from %s in %s", cfg.data.format, cfg.data.input, out)
    if store is not None:
        store.push(out)
    return str(out), prepared.stats


def reference_outputs(cfg: RunConfig, output_root: str, handoff: dict | None = None) -> tuple[dict, str | None]:
    """The eval set plus reference outputs written to a JSON file; (eval set info, path)."""
    store = begin_step(handoff, output_root)
    e = cfg.evaluation
    if not e.enabled:
        return {"enabled": False}, None
    from steps.evaluate import ModelRun, load_eval_set, make_judge, reference_outputs_for
    from steps.io import write_json

    make_judge(e.judge, device="cpu", **e.judge_options()).check()  # API keys and servers before any work
    eval_set = load_eval_set(e.eval_set, max_instructions=e.max_instructions)
    with cpu_heavy_section(cfg, "reference outputs"):
        run = ModelRun(e.backend, dtype=e.dtype, engine=e.engine)
        refs = reference_outputs_for(eval_set, cfg.model.base, e.generation, run)
    path = write_json(Path(output_root) / "eval" / "reference_outputs.json", refs)
    if store is not None:
        store.push(path)
    info = {
        "enabled": True,
        "name": eval_set.name,
        "n": len(eval_set.records),
        "subset": eval_set.subset,
        "reference_generator": refs[0]["generator"] if refs else None,
    }
    logger.info(
        "eval set %s (%d instructions), reference %s -> %s", info["name"], info["n"], info["reference_generator"], path
    )
    return info, str(path)


def train_sft(
    cfg: RunConfig, data_dir: str, output_root: str, handoff: dict | None = None, gang: Gang | None = None
) -> dict | None:
    """SFT on this node (or this node's share of a gang); the summary where global rank 0 ran, else None."""
    from steps.train.launch import train_node

    if not cfg.sft.enabled:
        return None
    node = _on_this_node(cfg, "sft", output_root, handoff, gang)
    return train_node(cfg, "sft", "sft", data_dir, output_root, None, *node)


def train_variant(
    plan: VariantPlan,
    data_dir: str,
    output_root: str,
    sft_summary: dict | None,
    handoff: dict | None = None,
    gang: Gang | None = None,
) -> dict | None:
    """One foreach branch: the ``sft`` variant carries the SFT model; the others train their resolved config."""
    from steps.train.launch import train_node

    if plan.loss == "sft":
        return sft_summary
    sft_model = sft_summary["model_dir"] if sft_summary else None
    node = _on_this_node(plan.config, plan.name, output_root, handoff, gang)
    return train_node(plan.config, plan.loss, plan.name, data_dir, output_root, sft_model, *node)


def _on_this_node(
    cfg: RunConfig, name: str, output_root: str, handoff: dict | None, gang: Gang | None
) -> tuple[ModelStore | None, Gang | None, Callable[[], contextlib.AbstractContextManager[None]]]:
    """What steps/train/launch.py:train_node needs besides the job: the store, the gang (None for one node) and
    this machine's heavy-step turn (node 0 takes it)."""
    gang = gang if gang is not None and gang.num_nodes > 1 else None
    return begin_step(handoff, output_root, gang), gang, functools.partial(cpu_heavy_section, cfg, name)


def evaluate_variant(
    plan: VariantPlan,
    train_summary: dict,
    reference_path: str | None,
    output_root: str,
    data_dir: str | None = None,
    handoff: dict | None = None,
) -> dict:
    """AlpacaEval 2 for one trained model, plus its accuracy on the held-out preference pairs: plain values."""
    store = begin_step(handoff, output_root)
    if store is not None:  # the model card is rewritten in the model directory even without evaluation
        store.ensure_all(train_summary["model_dir"])
    e = plan.config.evaluation
    base = {
        "variant": plan.name,
        "loss": plan.loss,
        "model_dir": train_summary["model_dir"],
        "init": train_summary["init_label"],
        "epoch": train_summary["config"].get("epochs"),
    }
    if not e.enabled or reference_path is None:
        return publish_variant(plan, train_summary, {**base, "evaluated": False}, output_root)
    from steps.evaluate import ModelRun, evaluate_model, load_eval_set
    from steps.io import read_json, read_jsonl

    init_model = train_summary.get("init") if e.weight_change_check else None  # compared with the scored model
    if store is not None:  # the held-out accuracy scores the training reference model too
        store.ensure_all(reference_path, data_dir, train_summary.get("reference"), init_model)
    eval_set = load_eval_set(e.eval_set, max_instructions=e.max_instructions)
    dev_pairs = Path(data_dir) / "preference.dev.jsonl" if data_dir else None
    heldout = read_jsonl(dev_pairs) if e.heldout_preference and dev_pairs and dev_pairs.is_file() else None
    training = train_summary.get("config") or {}
    with cpu_heavy_section(plan.config, f"evaluate {plan.name}"):
        metrics = evaluate_model(
            train_summary["model_dir"],
            eval_set,
            read_json(reference_path),
            generator=f"prefflow-{plan.name}-{Path(output_root).name}",
            out_dir=Path(output_root) / "eval" / plan.name,
            generation=e.generation,
            judge=e.judge,
            **e.judge_options(),
            lc_assets_dir=e.lc_assets_dir,
            cache_dir=Path(output_root).parent / "judge_cache",
            heldout_pairs=heldout,
            heldout_reference=train_summary.get("reference"),
            heldout_beta=float((training.get("criterion_config") or {}).get("beta", 0.1)),
            heldout_max_pairs=e.heldout_max_pairs,
            heldout_max_seq_len=int(training.get("max_seq_len", 2048)),
            agreement_registry=e.agreement_registry,
            init_model=init_model,
            run=ModelRun(e.backend, dtype=e.dtype, engine=e.engine),  # dtype auto: bf16 on a CUDA GPU, fp32 on CPU
        )
    result = {**base, "evaluated": True, **metrics}
    if store is not None:
        store.push(Path(output_root) / "eval" / plan.name)  # the join reads the annotations
    from steps.train.recipes import make_tracker

    with make_tracker(plan.config, Path(output_root) / plan.name) as tracker:
        tracker.log(metrics, step=0, prefix="eval")
    return publish_variant(plan, train_summary, result, output_root)


def publish_variant(plan: VariantPlan, train_summary: dict, result: dict, output_root: str) -> dict:
    """Rewrite the model's card with this run and its eval results, then upload it when push_to_hub asks."""
    from steps.hub import push_to_hub, repo_id_for
    from steps.model_card import write_model_card

    root, hub = Path(output_root), plan.config.push_to_hub
    wanted = hub.repo_id is not None and (hub.variants is None or plan.name in hub.variants)
    repo_id = repo_id_for(hub.repo_id, plan.name, root.name) if wanted and hub.repo_id else None
    write_model_card(
        train_summary["model_dir"],
        summary=train_summary,
        run_config=plan.config.to_dict(),
        eval_result=result if result.get("evaluated") else None,
        pathspec=f"{root.parent.name}/{root.name}",
        name=repo_id,
    )
    if repo_id is None:
        return result
    upload = push_to_hub(train_summary["model_dir"], repo_id, hub.private, dry_run=hub.dry_run)
    return {**result, "hub": {k: v for k, v in upload.items() if k != "files"} | {"n_files": len(upload["files"])}}


def collect_results(
    results: list[dict],
    summaries: list[dict],
    evaluation: EvaluationConfig,
    handoff: dict | None = None,
    output_root: str | None = None,
) -> list[dict]:
    """The join: one row per model with its training facts and, where a baseline row exists, the paired
    difference in win rate from it on the same instructions (a seeded bootstrap interval)."""
    store = begin_step(handoff, output_root) if output_root else None
    if store is not None:
        store.ensure_all(*(r["files"]["annotations"] for r in results if r.get("evaluated")))
    rows = []
    for res, summ in zip(results, summaries):
        rows.append(
            {
                **res,
                "train_steps": summ["steps"],
                "train_elapsed_s": summ["elapsed_s"],
                "final_dev": summ["final_dev"],
                "training_config": summ["config"],
            }
        )
    _add_paired(rows, evaluation)
    return sorted(rows, key=lambda r: (r["loss"] != "sft", r["variant"]))


def _add_paired(rows: list[dict], evaluation: EvaluationConfig) -> None:
    from steps.evaluate.paired import paired_comparison
    from steps.evaluate.scoring import AnnotationsError
    from steps.io import read_json

    name = evaluation.paired_baseline
    base = next((r for r in rows if r.get("variant") == name and r.get("evaluated")), None)
    base_annotations = read_json(base["files"]["annotations"]) if base is not None else None  # read once
    for row in rows:
        row["paired_vs"] = {"baseline": name, "is_baseline": True} if row is base else None
        if base_annotations is None or row is base or not row.get("evaluated"):
            continue
        try:
            paired = paired_comparison(
                read_json(row["files"]["annotations"]),
                base_annotations,
                seed=evaluation.paired_seed,
                resamples=evaluation.paired_resamples,
            )
        except AnnotationsError as exc:  # e.g. a judge that gave no usable preference: the cell shows n/a
            logger.warning("%s: no paired comparison with %s: %s", row.get("variant"), name, exc)
            row["paired_vs"] = {"baseline": name, "unavailable": str(exc)}
            continue
        row["paired_vs"] = {"baseline": name, **paired}


def format_results_table(results: list[dict], flow: str, run_id: str, created_at: datetime | None = None) -> str:
    """The report's results table (steps/report/table.py) for this run, before the run's records exist."""
    return run_results_table(results, flow, run_id, created_at)


def print_results(results: list[dict], flow: str, run_id: str) -> None:
    print(format_results_table(results, flow, run_id))
    for r in results:
        if r.get("evaluated"):
            print(
                f"{r['variant']}: judge={r.get('judge')} eval_set={r.get('eval_set')} "
                f"reference={r.get('reference_generator')} lc_method={r.get('lc_method')} n={r.get('n_total')}"
            )
