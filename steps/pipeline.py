"""The work behind each step of flows/pipeline.py as plain functions (testable without Metaflow).

Each takes the step's :class:`StepContext` (built once per step); training steps return a
:class:`steps.results.TrainResult`, evaluation an :class:`steps.evaluate.EvalResult`; model weights travel as
directories."""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from steps.config import EvaluationConfig, RunConfig, RunPlan, VariantPlan, config_to_dict, plan_for_start
from steps.config.loading import METAFLOW_SOURCE
from steps.config.plan import SFT
from steps.model_store import handoff_location as _handoff_location
from steps.report.table import run_results_table
from steps.results import TrainResult
from steps.step_context import StepContext, setup_logging, step_context
from steps.train.gang import current_gang, gang_summary

if TYPE_CHECKING:
    from steps.evaluate import AlpacaEvalResult, EvalResult, HeldoutPreference, ModelRun, PairedVs, VariantResult

__all__ = ["current_gang", "gang_summary", "step_context"]  # the flow's steps call them from here

logger = logging.getLogger(__name__)


def plan_run(
    config: Mapping, loss_arg: str, set_arg: str, sweep_path: str, flow_name: str, run_id: str
) -> tuple[RunPlan, str]:
    """start: the typed config (``--set`` applied), the losses and one resolved config per variant; the output root."""
    setup_logging()
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


def variant_route(layout: str, plan: VariantPlan) -> str:
    """Where a variant goes after ``preference``: ``rounds`` (on-policy rounds, steps.onpolicy.planning), ``gang``
    (its training gang) or ``one_node`` (trained in ``preference``, then evaluated)."""
    from steps.onpolicy.planning import runs_rounds

    if runs_rounds(plan):
        return "rounds"
    return "gang" if layout == "gang" and plan.loss != "sft" else "one_node"


def evaluate_variant(
    ctx: StepContext,
    plan: VariantPlan,
    train_summary: TrainResult,
    reference_path: str | None,
    data_dir: str | None = None,
) -> EvalResult:
    """AlpacaEval 2 for one trained model, plus its accuracy on the held-out preference pairs, IFBench and the
    ``evaluation.benchmarks`` lm-eval tasks: the step's EvalResult (unevaluated where evaluation is off), after its
    model card is rewritten and any upload done."""
    from steps.evaluate import EvalContext, EvalResult, ModelRun, evaluate_model, load_eval_set, write_metrics
    from steps.evaluate.benchmark_suite import evaluate_benchmarks
    from steps.io import read_json

    store, output_root = ctx.store, ctx.output_root
    if store is not None:  # the model card is rewritten in the model directory even without evaluation
        store.ensure_all(train_summary.model_dir)
    e = plan.config.evaluation
    trained = EvalResult(
        variant=plan.name,
        loss=plan.loss,
        model_dir=train_summary.model_dir,
        init=train_summary.init_label,
        epoch=train_summary.config.epochs,
    )
    if not e.enabled or reference_path is None:
        return publish_variant(plan, train_summary, trained, output_root)
    init_model = train_summary.init if e.weight_change_check else None  # compared with the scored model
    reference = train_summary.reference
    if store is not None:  # the held-out accuracy scores the training reference model too
        store.ensure_all(reference_path, data_dir, reference, init_model)
    eval_set = load_eval_set(e.eval_set, max_instructions=e.max_instructions)
    out_dir = Path(output_root) / "eval" / plan.name
    context = EvalContext(
        generator=f"prefflow-{plan.name}-{Path(output_root).name}",
        out_dir=out_dir,
        run=ModelRun(e.backend, dtype=e.dtype, engine=e.engine),  # dtype auto: bf16 on a CUDA GPU, fp32 on CPU
        cache_dir=Path(output_root).parent / "judge_cache",
        init_model=init_model,
    )
    with ctx.heavy_turn(f"evaluate {plan.name}"):
        evaluation = evaluate_model(trained.model_dir, eval_set, read_json(reference_path), e, context)
        heldout = heldout_metrics(plan, train_summary, data_dir, context.run)
        ifbench, benchmarks = evaluate_benchmarks(trained.model_dir, e, context)
    if heldout is not None:
        write_metrics(evaluation, heldout)
    result = dataclasses.replace(
        trained, alpaca_eval=evaluation, heldout=heldout, ifbench=ifbench, benchmarks=benchmarks
    )
    if store is not None:
        store.push(out_dir)  # the join reads the annotations
    from steps.train.recipes import make_tracker

    with make_tracker(plan.config, Path(output_root) / plan.name) as tracker:
        tracker.log(result.metrics(), step=0, prefix="eval")
    return publish_variant(plan, train_summary, result, output_root)


def heldout_metrics(
    plan: VariantPlan, train_summary: TrainResult, data_dir: str | None, run: ModelRun
) -> HeldoutPreference | None:
    """The model's judge-free accuracy on the dev preference pairs (with the training reference, reward metrics),
    tokenised and scaled as its own training section says; None where ``evaluation.heldout_preference`` is off or
    the run has no dev pairs."""
    from steps.evaluate import HeldoutScoring, heldout_preference_metrics
    from steps.io import read_jsonl

    e = plan.config.evaluation
    dev_pairs = Path(data_dir) / "preference.dev.jsonl" if data_dir else None
    if not e.heldout_preference or dev_pairs is None or not dev_pairs.is_file():
        return None
    gc.collect()  # the judge model goes before the scored models load
    scoring = HeldoutScoring.for_variant(train_summary.config, e.heldout_max_pairs)
    return heldout_preference_metrics(
        train_summary.model_dir, read_jsonl(dev_pairs), scoring, run, reference=train_summary.reference
    )


def publish_variant(plan: VariantPlan, train_summary: TrainResult, result: EvalResult, output_root: str) -> EvalResult:
    """Rewrite the model's card with this run and its eval results, then upload it when push_to_hub asks."""
    from steps.evaluate import HubUpload
    from steps.hub import push_to_hub, repo_id_for
    from steps.model_card import write_model_card

    root, hub = Path(output_root), plan.config.push_to_hub
    wanted = hub.repo_id is not None and (hub.variants is None or plan.name in hub.variants)
    repo_id = repo_id_for(hub.repo_id, plan.name, root.name) if wanted and hub.repo_id else None
    write_model_card(
        train_summary.model_dir,
        summary=train_summary,
        run_config=plan.config.to_dict(),
        eval_result=result.alpaca_eval,
        pathspec=f"{root.parent.name}/{root.name}",
        name=repo_id,
    )
    if repo_id is None:
        return result
    upload = push_to_hub(train_summary.model_dir, repo_id, hub.private, dry_run=hub.dry_run)
    return dataclasses.replace(result, hub=HubUpload.of(upload))


def branch_models(
    round_outcomes: list, result: EvalResult, train_summary: TrainResult
) -> list[tuple[EvalResult, TrainResult]]:
    """The models of one foreach branch at the join: every on-policy round's (``round_outcomes``,
    steps.onpolicy.flow_round.RoundOutcome), else the branch's one model."""
    return [(o.result, o.train) for o in round_outcomes] or [(result, train_summary)]


def collect_results(ctx: StepContext, results: list[EvalResult], summaries: list[TrainResult]) -> list[VariantResult]:
    """The join: one row per model with its training facts and, where a baseline row exists, the paired
    differences in win rate and in IFBench accuracy from it on the same instructions (seeded bootstrap intervals)."""
    from steps.evaluate import VariantResult
    from steps.evaluate.paired_ifbench import add_paired_ifbench

    store, evaluation = ctx.store, ctx.config.evaluation
    if store is not None:
        store.ensure_all(*(r.alpaca_eval.files.annotations for r in results if r.alpaca_eval is not None))
        store.ensure_all(*(r.ifbench.files.results for r in results if r.ifbench is not None))
    rows = [
        VariantResult(
            evaluation=res,
            train_steps=summ.steps,
            train_elapsed_s=summ.elapsed_s,
            final_dev=summ.final_dev,
            training_config=config_to_dict(summ.config),
        )
        for res, summ in zip(results, summaries)
    ]
    rows = _add_paired(rows, evaluation)
    rows = add_paired_ifbench(rows, evaluation)
    if any(r.evaluation.round is not None for r in rows):
        from steps.onpolicy.round_results import add_previous_round

        rows = add_previous_round(rows, summaries, evaluation)
    return sorted(
        rows, key=lambda r: (r.evaluation.loss != SFT, r.evaluation.round_of or r.variant, r.evaluation.round or 0)
    )


def _add_paired(rows: list[VariantResult], evaluation: EvaluationConfig) -> list[VariantResult]:
    """``rows`` with their paired comparison against ``evaluation.paired_baseline`` (where that row was evaluated).
    A row whose provenance differs from the baseline's (another judge, alpaca_eval version, eval set, decoding,
    dtype, ...: ``steps.evaluate.provenance.pairing_refusal``) is not compared: its cell says why."""
    from steps.evaluate import PairedVs
    from steps.io import read_json

    name = evaluation.paired_baseline
    base = next((r for r in rows if r.variant == name and r.evaluation.alpaca_eval is not None), None)
    if name is None or base is None or base.evaluation.alpaca_eval is None:
        return rows
    base_result = base.evaluation.alpaca_eval
    base_annotations = read_json(base_result.files.annotations)  # read once
    out = []
    for row in rows:
        evaluated = row.evaluation.alpaca_eval
        if row is base:
            paired: PairedVs | None = PairedVs(name, is_baseline=True)
        elif evaluated is None:
            paired = None
        else:
            paired = _paired_vs(row.variant, evaluated, base_result, base_annotations, evaluation)
        out.append(dataclasses.replace(row, paired_vs=paired))
    return out


def _paired_vs(
    variant: str,
    evaluated: AlpacaEvalResult,
    base: AlpacaEvalResult,
    base_annotations: list[dict],
    evaluation: EvaluationConfig,
) -> PairedVs:
    """One row's paired comparison with the baseline ``evaluation.paired_baseline``, or why there is none."""
    from steps.evaluate import PairedVs
    from steps.evaluate.paired import paired_comparison
    from steps.evaluate.provenance import pairing_refusal
    from steps.evaluate.scoring import AnnotationsError
    from steps.io import read_json

    name = str(evaluation.paired_baseline)
    refusal = pairing_refusal(evaluated.provenance, base.provenance, name)
    if refusal is not None:
        logger.warning("%s: %s", variant, refusal)
        return PairedVs(name, unavailable=refusal)
    try:
        comparison = paired_comparison(
            read_json(evaluated.files.annotations),
            base_annotations,
            seed=evaluation.paired_seed,
            resamples=evaluation.paired_resamples,
        )
    except AnnotationsError as exc:  # e.g. a judge that gave no usable preference: the cell shows n/a
        logger.warning("%s: no paired comparison with %s: %s", variant, name, exc)
        return PairedVs(name, unavailable=str(exc))
    return PairedVs(name, comparison=comparison)


def format_results_table(
    results: list[VariantResult], flow: str, run_id: str, created_at: datetime | None = None
) -> str:
    """The report's results table (steps/report/table.py) for this run, before the run's records exist."""
    return run_results_table(results, flow, run_id, created_at)


def print_results(results: list[VariantResult], flow: str, run_id: str) -> None:
    print(format_results_table(results, flow, run_id))
    for r in results:
        evaluated = r.evaluation.alpaca_eval
        if evaluated is not None:
            print(
                f"{r.variant}: judge={evaluated.judge.label} eval_set={evaluated.eval_set} "
                f"reference={evaluated.reference_generator} lc_method={evaluated.scores.lc_method} "
                f"n={evaluated.scores.n_total}"
            )
