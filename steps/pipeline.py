"""The work behind each step of flows/pipeline.py as plain functions (testable without Metaflow).

Steps take the typed config planned in ``start``; evaluation results are typed (steps/evaluate/results.py), training
summaries plain dicts; model weights travel as directories."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from steps.config import EvaluationConfig, RunConfig, RunPlan, TrainConfig, VariantPlan, plan_for_start
from steps.config.loading import METAFLOW_SOURCE
from steps.config.plan import SFT
from steps.locks import file_lock
from steps.model_store import ModelStore, open_store
from steps.model_store import handoff_location as _handoff_location
from steps.report.table import run_results_table
from steps.train.gang import Gang, current_gang, gang_summary

if TYPE_CHECKING:
    from steps.evaluate import EvalResult, HeldoutPreference, ModelRun, VariantResult

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
) -> EvalResult:
    """AlpacaEval 2 for one trained model, plus its accuracy on the held-out preference pairs: the step's
    EvalResult (unevaluated where evaluation is off), after its model card is rewritten and any upload done."""
    from steps.evaluate import EvalContext, EvalResult, ModelRun, evaluate_model, load_eval_set, write_metrics
    from steps.io import read_json

    store = begin_step(handoff, output_root)
    if store is not None:  # the model card is rewritten in the model directory even without evaluation
        store.ensure_all(train_summary["model_dir"])
    e = plan.config.evaluation
    trained = EvalResult(
        variant=plan.name,
        loss=plan.loss,
        model_dir=train_summary["model_dir"],
        init=train_summary["init_label"],
        epoch=_training_section(plan).epochs,
    )
    if not e.enabled or reference_path is None:
        return publish_variant(plan, train_summary, trained, output_root)
    init_model = train_summary["init"] if e.weight_change_check else None  # compared with the scored model
    reference = train_summary["reference"]
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
    with cpu_heavy_section(plan.config, f"evaluate {plan.name}"):
        evaluation = evaluate_model(trained.model_dir, eval_set, read_json(reference_path), e, context)
        heldout = heldout_metrics(plan, trained.model_dir, reference, data_dir, context.run)
    if heldout is not None:
        write_metrics(evaluation, heldout)
    result = dataclasses.replace(trained, alpaca_eval=evaluation, heldout=heldout)
    if store is not None:
        store.push(out_dir)  # the join reads the annotations
    from steps.train.recipes import make_tracker

    with make_tracker(plan.config, Path(output_root) / plan.name) as tracker:
        tracker.log(result.metrics(), step=0, prefix="eval")
    return publish_variant(plan, train_summary, result, output_root)


def _training_section(plan: VariantPlan) -> TrainConfig:
    """The typed training section the variant trained with: SFT's, or the preference section resolved for its loss."""
    return plan.config.sft if plan.loss == SFT else plan.config.preference


def heldout_metrics(
    plan: VariantPlan, model_dir: str, reference: str | None, data_dir: str | None, run: ModelRun
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
    scoring = HeldoutScoring.for_variant(_training_section(plan), e.heldout_max_pairs)
    return heldout_preference_metrics(model_dir, read_jsonl(dev_pairs), scoring, run, reference=reference)


def publish_variant(plan: VariantPlan, train_summary: dict, result: EvalResult, output_root: str) -> EvalResult:
    """Rewrite the model's card with this run and its eval results, then upload it when push_to_hub asks."""
    from steps.evaluate import HubUpload
    from steps.hub import push_to_hub, repo_id_for
    from steps.model_card import write_model_card

    root, hub = Path(output_root), plan.config.push_to_hub
    wanted = hub.repo_id is not None and (hub.variants is None or plan.name in hub.variants)
    repo_id = repo_id_for(hub.repo_id, plan.name, root.name) if wanted and hub.repo_id else None
    write_model_card(
        train_summary["model_dir"],
        summary=train_summary,
        run_config=plan.config.to_dict(),
        eval_result=result.alpaca_eval,
        pathspec=f"{root.parent.name}/{root.name}",
        name=repo_id,
    )
    if repo_id is None:
        return result
    upload = push_to_hub(train_summary["model_dir"], repo_id, hub.private, dry_run=hub.dry_run)
    return dataclasses.replace(result, hub=HubUpload.of(upload))


def collect_results(
    results: list[EvalResult],
    summaries: list[dict],
    evaluation: EvaluationConfig,
    handoff: dict | None = None,
    output_root: str | None = None,
) -> list[VariantResult]:
    """The join: one row per model with its training facts and, where a baseline row exists, the paired
    difference in win rate from it on the same instructions (a seeded bootstrap interval)."""
    from steps.evaluate import VariantResult

    store = begin_step(handoff, output_root) if output_root else None
    if store is not None:
        store.ensure_all(*(r.alpaca_eval.files.annotations for r in results if r.alpaca_eval is not None))
    rows = [
        VariantResult(
            evaluation=res,
            train_steps=summ["steps"],
            train_elapsed_s=summ["elapsed_s"],
            final_dev=summ["final_dev"],
            training_config=summ["config"],
        )
        for res, summ in zip(results, summaries)
    ]
    rows = _add_paired(rows, evaluation)
    return sorted(rows, key=lambda r: (r.evaluation.loss != SFT, r.variant))


def _add_paired(rows: list[VariantResult], evaluation: EvaluationConfig) -> list[VariantResult]:
    """``rows`` with their paired comparison against ``evaluation.paired_baseline`` (where that row was evaluated)."""
    from steps.evaluate import PairedVs
    from steps.evaluate.paired import paired_comparison
    from steps.evaluate.scoring import AnnotationsError
    from steps.io import read_json

    name = evaluation.paired_baseline
    base = next((r for r in rows if r.variant == name and r.evaluation.alpaca_eval is not None), None)
    if name is None or base is None or base.evaluation.alpaca_eval is None:
        return rows
    base_annotations = read_json(base.evaluation.alpaca_eval.files.annotations)  # read once
    out = []
    for row in rows:
        evaluated = row.evaluation.alpaca_eval
        if row is base:
            paired = PairedVs(name, is_baseline=True)
        elif evaluated is None:
            paired = None
        else:
            try:
                comparison = paired_comparison(
                    read_json(evaluated.files.annotations),
                    base_annotations,
                    seed=evaluation.paired_seed,
                    resamples=evaluation.paired_resamples,
                )
                paired = PairedVs(name, comparison=comparison)
            except AnnotationsError as exc:  # e.g. a judge that gave no usable preference: the cell shows n/a
                logger.warning("%s: no paired comparison with %s: %s", row.variant, name, exc)
                paired = PairedVs(name, unavailable=str(exc))
        out.append(dataclasses.replace(row, paired_vs=paired))
    return out


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
