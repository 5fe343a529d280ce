"""The work behind each step of flows/pipeline.py as plain functions (testable without Metaflow).

Each takes the step's :class:`StepContext` (built once per step); training steps return a
:class:`steps.results.TrainResult`, the others plain values; model weights travel as directories."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from steps.config import EvaluationConfig, RunConfig, RunPlan, VariantPlan, config_to_dict, load_plan
from steps.config.loading import METAFLOW_SOURCE
from steps.model_store import handoff_location as _handoff_location
from steps.report.table import run_results_table
from steps.results import TrainResult
from steps.step_context import StepContext, setup_logging, step_context
from steps.train.gang import current_gang, gang_summary

__all__ = ["current_gang", "gang_summary", "step_context"]  # the flow's steps call them from here

logger = logging.getLogger(__name__)


def plan_run(
    config: Mapping, loss_arg: str, set_arg: str, sweep_path: str, flow_name: str, run_id: str
) -> tuple[RunPlan, str]:
    """start: the typed config (``--set`` applied), the losses and one resolved config per variant; the output root."""
    setup_logging()
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # Metaflow's ConfigValue
    plan = load_plan(data, METAFLOW_SOURCE, set_arg, loss_arg, sweep_path)
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


def handoff_location(cfg: RunConfig, output_root: str, flow_name: str) -> dict | None:
    """start: where this run hands files between steps (None: ``resources.model_store`` resolves to shared)."""
    return _handoff_location(cfg.resources.handoff(), output_root, flow_name)


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


def prepare_data(ctx: StepContext) -> tuple[str, dict]:
    """The data section's input, in its format, -> SFT examples and preference pairs under the run's data dir."""
    from steps.data import prepare_data as prepare

    data, store = ctx.config.data, ctx.store
    out = Path(ctx.output_root) / "data"
    prepared = prepare(data, out)
    logger.info("prepared %s data from %s in %s", data.format, data.input, out)
    if store is not None:
        store.push(out)
    return str(out), prepared.stats


def reference_outputs(ctx: StepContext) -> tuple[dict, str | None]:
    """The eval set plus reference outputs written to a JSON file; (eval set info, path)."""
    cfg, store, output_root = ctx.config, ctx.store, ctx.output_root
    e = cfg.evaluation
    if not e.enabled:
        return {"enabled": False}, None
    from steps.evaluate import ModelRun, load_eval_set, make_judge, reference_outputs_for
    from steps.io import write_json

    make_judge(e.judge, device="cpu", **e.judge_options()).check()  # API keys and servers before any work
    eval_set = load_eval_set(e.eval_set, max_instructions=e.max_instructions)
    with ctx.heavy_turn("reference outputs"):
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


def train_sft(ctx: StepContext, data_dir: str) -> TrainResult | None:
    """SFT on this node (or this node's share of a gang); the result where global rank 0 ran, else None."""
    from steps.train.launch import train_on_node

    if not ctx.config.sft.enabled:
        return None
    return train_on_node(ctx, "sft", "sft", data_dir, None)


def train_variant(ctx: StepContext, plan: VariantPlan, data_dir: str, sft: TrainResult | None) -> TrainResult | None:
    """One foreach branch (``ctx.config`` is ``plan.config``): the ``sft`` variant carries the SFT model; the others
    train their resolved config from it (or from what ``preference.init`` names)."""
    from steps.train.launch import train_on_node

    if plan.loss == "sft":
        return sft
    return train_on_node(ctx, plan.loss, plan.name, data_dir, sft.model_dir if sft is not None else None)


def evaluate_variant(
    ctx: StepContext,
    plan: VariantPlan,
    train_summary: TrainResult,
    reference_path: str | None,
    data_dir: str | None = None,
) -> dict:
    """AlpacaEval 2 for one trained model, plus its accuracy on the held-out preference pairs: plain values."""
    store, output_root = ctx.store, ctx.output_root
    if store is not None:  # the model card is rewritten in the model directory even without evaluation
        store.ensure_all(train_summary.model_dir)
    e = plan.config.evaluation
    base = {
        "variant": plan.name,
        "loss": plan.loss,
        "model_dir": train_summary.model_dir,
        "init": train_summary.init_label,
        "epoch": train_summary.config.epochs,
    }
    if not e.enabled or reference_path is None:
        return publish_variant(plan, train_summary, {**base, "evaluated": False}, output_root)
    from steps.evaluate import ModelRun, evaluate_model, load_eval_set
    from steps.evaluate.preference_metrics import DEFAULT_BETA
    from steps.io import read_json, read_jsonl

    init_model = train_summary.init if e.weight_change_check else None  # compared with the scored model
    if store is not None:  # the held-out accuracy scores the training reference model too
        store.ensure_all(reference_path, data_dir, train_summary.reference, init_model)
    eval_set = load_eval_set(e.eval_set, max_instructions=e.max_instructions)
    dev_pairs = Path(data_dir) / "preference.dev.jsonl" if data_dir else None
    heldout = read_jsonl(dev_pairs) if e.heldout_preference and dev_pairs and dev_pairs.is_file() else None
    beta = train_summary.loss_beta  # None (SFT, ORPO): the held-out metrics' own default scales the rewards
    with ctx.heavy_turn(f"evaluate {plan.name}"):
        metrics = evaluate_model(
            train_summary.model_dir,
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
            heldout_reference=train_summary.reference,
            heldout_beta=DEFAULT_BETA if beta is None else beta,
            heldout_max_pairs=e.heldout_max_pairs,
            heldout_max_seq_len=train_summary.config.max_seq_len,
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


def publish_variant(plan: VariantPlan, train_summary: TrainResult, result: dict, output_root: str) -> dict:
    """Rewrite the model's card with this run and its eval results, then upload it when push_to_hub asks."""
    from steps.hub import push_to_hub, repo_id_for
    from steps.model_card import write_model_card

    root, hub = Path(output_root), plan.config.push_to_hub
    wanted = hub.repo_id is not None and (hub.variants is None or plan.name in hub.variants)
    repo_id = repo_id_for(hub.repo_id, plan.name, root.name) if wanted and hub.repo_id else None
    write_model_card(
        train_summary.model_dir,
        summary=train_summary,
        run_config=plan.config.to_dict(),
        eval_result=result if result.get("evaluated") else None,
        pathspec=f"{root.parent.name}/{root.name}",
        name=repo_id,
    )
    if repo_id is None:
        return result
    upload = push_to_hub(train_summary.model_dir, repo_id, hub.private, dry_run=hub.dry_run)
    return {**result, "hub": {k: v for k, v in upload.items() if k != "files"} | {"n_files": len(upload["files"])}}


def collect_results(ctx: StepContext, results: list[dict], summaries: list[TrainResult]) -> list[dict]:
    """The join: one row per model with its training facts and, where a baseline row exists, the paired
    difference in win rate from it on the same instructions (a seeded bootstrap interval)."""
    store, evaluation = ctx.store, ctx.config.evaluation
    if store is not None:
        store.ensure_all(*(r["files"]["annotations"] for r in results if r.get("evaluated")))
    rows = []
    for res, summ in zip(results, summaries):
        rows.append(
            {
                **res,
                "train_steps": summ.steps,
                "train_elapsed_s": summ.elapsed_s,
                "final_dev": summ.final_dev,
                "training_config": config_to_dict(summ.config),
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
