"""The flow's two calls: reference outputs for an eval set, and one model's evaluation against them (generate,
judge, score, write ``model_outputs.json``, ``annotations.json`` and ``metrics.json``), typed
(``steps.evaluate.results``)."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.evaluate.annotate import AnnotationInputError, annotate
from steps.evaluate.eval_sets import EvalSet
from steps.evaluate.generation import ModelRun, answer_eval_set, generation_dtype, resolve_backend
from steps.evaluate.judges import make_judge
from steps.evaluate.provenance import Provenance, build_provenance
from steps.evaluate.results import AlpacaEvalResult, EvalFiles, HeldoutPreference, JudgeRecord
from steps.evaluate.scoring import score
from steps.evaluate.settings import GenerationSettings
from steps.evaluate.weight_changes import WeightChange, weight_change
from steps.io import read_json, write_json

if TYPE_CHECKING:
    from steps.config import EvaluationConfig

logger = logging.getLogger(__name__)

MODEL_OUTPUTS_FILE = "model_outputs.json"
ANNOTATIONS_FILE = "annotations.json"
METRICS_FILE = "metrics.json"
GENERATION_FILE = "generation.json"


def reference_outputs_for(
    eval_set: EvalSet,
    starting_model_spec: str,
    generation: GenerationSettings,
    run: ModelRun = ModelRun(),
) -> list[dict[str, Any]]:
    """The eval set's own reference outputs when it has them, else the starting model's answers (made as ``run``
    says: backend, device, dtype, a loaded model).

    Generated references are named ``reference:<spec>`` so no result can pass them off as AlpacaEval's.
    """
    if eval_set.has_outputs:
        return [
            {
                "instruction": r["instruction"],
                "output": r["output"],
                "generator": r.get("generator"),
                **({"dataset": r["dataset"]} if r.get("dataset") is not None else {}),
            }
            for r in eval_set.records
        ]
    records, info = answer_eval_set(starting_model_spec, eval_set, f"reference:{starting_model_spec}", generation, run)
    logger.info(
        "generated %d reference outputs with %s (%s, %.2f prompts/s)",
        len(records),
        starting_model_spec,
        info["backend"],
        info["prompts_per_second"] or 0.0,
    )
    return records


@dataclass(frozen=True)
class EvalContext:
    """What one evaluation needs besides the run config's ``evaluation`` section: the name its outputs carry
    (``generator``), where its files go (``out_dir``), where judgements are cached (``cache_dir``, None: no cache),
    how the model runs (``run``: backend, device, dtype, a loaded model) and the spec training started from
    (``init_model``: the weight-change check compares with it; None: no check)."""

    generator: str
    out_dir: Path
    run: ModelRun = field(default_factory=ModelRun)
    cache_dir: Path | None = None
    init_model: str | None = None


def evaluate_model(
    model_spec: str,
    eval_set: EvalSet,
    reference_outputs: list[dict[str, Any]],
    settings: EvaluationConfig,
    context: EvalContext,
) -> AlpacaEvalResult:
    """Generate with ``model_spec`` (or ``context.run.model``), judge against ``reference_outputs``, score; write
    ``model_outputs.json``, ``annotations.json`` and ``metrics.json`` to ``context.out_dir``.

    ``settings`` (the run config's typed ``evaluation`` section) gives the generation settings, the judge and its
    options, the LC assets, the agreement registry and whether to check weight changes. The judge is made and
    checked first, so a missing API key fails before any generation. Outputs already in ``out_dir`` from the same
    model, instructions and settings are reused (a retried step does not generate again); judgements are reused
    through ``context.cache_dir``. With ``context.init_model`` the result says whether the scored model differs
    from it in the dtype the answers are generated in. Held-out preference metrics are the caller's
    (``steps.evaluate.preference_metrics``; :func:`write_metrics` adds them to metrics.json).
    """
    if len(reference_outputs) != len(eval_set):
        raise AnnotationInputError(
            f"{len(reference_outputs)} reference outputs for {len(eval_set)} instructions of eval set {eval_set.name}"
        )
    run = context.run
    judge = make_judge(
        settings.judge, device=run.device, dtype=run.dtype, show_progress=run.show_progress, **settings.judge_options()
    )
    judge.check()
    changes = None
    if settings.weight_change_check and context.init_model is not None:
        changes = _weight_change(model_spec, context.init_model, run)
    model_outputs, generation = _model_outputs(model_spec, eval_set, settings.generation, context)
    gc.collect()  # what generation loaded goes before the judge model loads

    files = EvalFiles(*(str(context.out_dir / name) for name in (MODEL_OUTPUTS_FILE, ANNOTATIONS_FILE, METRICS_FILE)))
    annotations = annotate(model_outputs, reference_outputs, judge, cache_dir=context.cache_dir)
    write_json(files.annotations, annotations)
    logger.info("wrote %s", files.annotations)
    scores = score(
        annotations,
        lc_assets_dir=settings.lc_assets_dir,
        subset=eval_set.subset,
        alpaca_eval_order=eval_set.alpaca_eval_order,
        source=files.annotations,
    )
    references = sorted({str(r.get("generator")) for r in reference_outputs})  # alpaca_eval records: may lack it
    provenance = build_provenance(judge, eval_set.name, eval_set.instructions, reference_outputs, generation)
    _log_provenance(provenance)
    result = AlpacaEvalResult(
        model=model_spec,
        generator=context.generator,
        scores=scores,
        judge=JudgeRecord.of(judge, annotations, settings.agreement_registry),
        weight_change=changes,
        eval_set=eval_set.name,
        eval_set_source=str(eval_set.source),
        subset=eval_set.subset,
        n_instructions=len(eval_set),
        reference_generator=references[0] if len(references) == 1 else references,
        generation=generation,
        files=files,
        provenance=provenance,
    )
    write_metrics(result)
    _log_result(result)
    return result


def write_metrics(result: AlpacaEvalResult, heldout: HeldoutPreference | None = None) -> Path:
    """metrics.json of ``result`` (with the held-out metrics, when the caller computed them)."""
    return write_json(result.files.metrics, result.metrics_json(heldout))


def _weight_change(model_spec: str, init_model: str, run: ModelRun) -> WeightChange:
    """The share of weights that differ from the init in the dtype generation runs in (the model as scored)."""
    dtype = generation_dtype(run, resolve_backend(run.backend, run.model if run.model is not None else model_spec))
    return weight_change(model_spec, init_model, dtype, show_progress=run.show_progress)


def _model_outputs(
    model_spec: str, eval_set: EvalSet, generation: GenerationSettings, context: EvalContext
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The model's outputs and how they were made (the settings, then backend, dtype and speed): reused from
    ``out_dir`` when the same model answered the same instructions with the same settings, else generated."""
    settings = generation.record()
    generation_record = {
        "model": model_spec,
        "generator": context.generator,
        "eval_set": eval_set.name,
        "instructions": eval_set.instructions,
        **settings,
    }
    outputs_path, generation_path = context.out_dir / MODEL_OUTPUTS_FILE, context.out_dir / GENERATION_FILE
    if outputs_path.is_file() and generation_path.is_file():
        previous = read_json(generation_path)
        if "info" in previous and {k: previous.get(k) for k in generation_record} == generation_record:
            outputs = read_json(outputs_path)
            logger.info(
                "reusing %d outputs from %s (same model, instructions and settings)", len(outputs), outputs_path
            )
            return outputs, {**settings, **previous["info"]}
    # a model loaded for generation is freed on return; one passed in run.model is the caller's to free
    outputs, info = answer_eval_set(model_spec, eval_set, context.generator, generation, context.run)
    write_json(outputs_path, outputs)
    write_json(generation_path, {**generation_record, "info": info})
    logger.info("wrote %s", outputs_path)
    return outputs, {**settings, **info}


def _log_provenance(provenance: Provenance) -> None:
    """Say what the row records of what produced it (metrics.json's ``provenance`` holds the same)."""
    logger.info(
        "provenance: alpaca_eval %s, judge %s (%s, prompt sha256 %s), eval set %s (%d, sha256 %s), decoding %s, "
        "dtype %s, benchmarks %s, software %s",
        provenance.alpaca_eval_version,
        provenance.judge,
        provenance.annotator_config,
        provenance.annotator_prompt_sha256,
        provenance.eval_set,
        provenance.eval_set_size,
        provenance.eval_set_sha256,
        provenance.decoding,
        provenance.eval_dtype,
        provenance.benchmark_versions or "none installed",
        provenance.software_versions,
    )


def _log_result(result: AlpacaEvalResult) -> None:
    scores, changes = result.scores, result.weight_change
    unchanged = changes is not None and changes.changed == 0
    logger.info(
        "wrote %s: WR %s, LC %s (%s), judge %s%s%s",
        result.files.metrics,
        scores.win_rate,
        scores.length_controlled_winrate,
        scores.lc_unavailable_reason or scores.lc_method,
        result.judge.label,
        " [weak judge: mechanism check only]" if result.judge.weak else "",
        f" [scores of a model equal to its init in {changes.dtype}: {changes.note}]" if changes and unchanged else "",
    )
