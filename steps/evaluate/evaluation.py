"""The flow's two calls: reference outputs for an eval set, and one model's evaluation against them (generate,
judge, score, write ``model_outputs.json``, ``annotations.json`` and ``metrics.json``)."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.evaluate.agreement import recorded_agreement
from steps.evaluate.annotate import AnnotationInputError, annotate
from steps.evaluate.eval_sets import EvalSet
from steps.evaluate.generation import ModelRun, answer_eval_set, generation_dtype, resolve_backend
from steps.evaluate.judge_cost import judge_cost, judge_usage
from steps.evaluate.judges import DEFAULT_JUDGE, make_judge
from steps.evaluate.preference_metrics import DEFAULT_BETA, heldout_preference_metrics
from steps.evaluate.scoring import score
from steps.evaluate.settings import GenerationSettings
from steps.evaluate.weight_changes import weight_change
from steps.io import read_json, write_json

if TYPE_CHECKING:
    from typing import Unpack

    from steps.evaluate.settings import JudgeOptions

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


def evaluate_model(
    model_spec: str,
    eval_set: EvalSet,
    reference_outputs: list[dict[str, Any]],
    *,
    generator: str,
    out_dir: str | Path,
    generation: GenerationSettings,
    judge: str = DEFAULT_JUDGE,
    lc_assets_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    run: ModelRun = ModelRun(),
    heldout_pairs: Sequence[dict[str, Any]] | None = None,
    heldout_reference: str | None = None,
    heldout_beta: float = DEFAULT_BETA,
    heldout_max_pairs: int | None = None,
    heldout_max_seq_len: int = 2048,
    agreement_registry: str | Path | None = None,
    init_model: str | None = None,
    **judge_options: Unpack[JudgeOptions],
) -> dict[str, Any]:
    """Generate with ``model_spec`` (or ``run.model``, on ``run``'s backend, device and dtype), judge against
    ``reference_outputs``, score; write the files to ``out_dir`` and return the metrics plus what produced them.

    The judge is made and checked first, so a missing API key fails before any generation. Outputs already in
    ``out_dir`` from the same model, instructions and settings are reused (a retried step does not generate
    again); judgements are reused through ``cache_dir``. With ``heldout_pairs`` (dev preference rows) the result
    also carries ``heldout_preference`` (judge-free accuracies; reward metrics against ``heldout_reference``).
    Every result carries the judge's recorded agreement (``judge_agreement``, None if never measured), its
    tokens (``judge_tokens``) and estimated cost (``judge_cost_usd``, None for local or unpriced judges).
    ``judge_options`` go to ``make_judge`` with ``judge`` and ``run``'s device, dtype and show_progress.
    With ``init_model`` (the spec training started from) the result carries ``weight_change``: the share of
    weight entries that differ from it in the dtype the answers are generated in, and why where none does.
    """
    out_dir = Path(out_dir)
    if len(reference_outputs) != len(eval_set):
        raise AnnotationInputError(
            f"{len(reference_outputs)} reference outputs for {len(eval_set)} instructions of eval set {eval_set.name}"
        )
    pairwise_judge = make_judge(
        judge, device=run.device, dtype=run.dtype, show_progress=run.show_progress, **judge_options
    )
    pairwise_judge.check()
    changes = None
    if init_model is not None:  # the model as it will be scored: in the dtype generation runs in
        dtype = generation_dtype(run, resolve_backend(run.backend, run.model if run.model is not None else model_spec))
        changes = weight_change(model_spec, init_model, dtype, show_progress=run.show_progress).record()

    settings = generation.record()
    generation_record = {
        "model": model_spec,
        "generator": generator,
        "eval_set": eval_set.name,
        "instructions": eval_set.instructions,
        **settings,
    }
    outputs_path, generation_path = out_dir / MODEL_OUTPUTS_FILE, out_dir / GENERATION_FILE
    model_outputs: list[dict[str, Any]] | None = None
    if outputs_path.is_file() and generation_path.is_file():
        previous = read_json(generation_path)
        if {k: previous.get(k) for k in generation_record} == generation_record:
            model_outputs = read_json(outputs_path)
            generation_info = previous.get("info", {})
            logger.info(
                "reusing %d outputs from %s (same model, instructions and settings)", len(model_outputs), outputs_path
            )
    if model_outputs is None:
        # a model loaded for generation is freed on return; one passed in run.model is the caller's to free
        model_outputs, generation_info = answer_eval_set(model_spec, eval_set, generator, generation, run)
        write_json(outputs_path, model_outputs)
        write_json(generation_path, {**generation_record, "info": generation_info})
        logger.info("wrote %s", outputs_path)
    heldout = None
    if heldout_pairs is not None:
        heldout = heldout_preference_metrics(
            model_spec,
            heldout_pairs,
            reference_spec=heldout_reference,
            beta=heldout_beta,
            device=run.device,
            dtype=run.dtype,
            max_seq_len=heldout_max_seq_len,
            max_pairs=heldout_max_pairs,
            model=run.model,
            tokenizer=run.tokenizer,
            show_progress=run.show_progress,
        )
    gc.collect()  # what generation and the held-out metrics loaded goes before the judge model loads

    annotations = annotate(model_outputs, reference_outputs, pairwise_judge, cache_dir=cache_dir)
    write_json(out_dir / ANNOTATIONS_FILE, annotations)
    logger.info("wrote %s", out_dir / ANNOTATIONS_FILE)

    metrics = score(
        annotations,
        lc_assets_dir=lc_assets_dir,
        subset=eval_set.subset,
        alpaca_eval_order=eval_set.alpaca_eval_order,
        source=str(out_dir / ANNOTATIONS_FILE),
    )
    references = sorted({str(r.get("generator")) for r in reference_outputs})
    tokens = judge_usage(annotations)
    cost, price, cost_note = judge_cost(tokens, pairwise_judge.price_model)
    result = {
        **metrics,
        "model": model_spec,
        "generator": generator,
        **pairwise_judge.metadata(),
        "judge_agreement": recorded_agreement(pairwise_judge, agreement_registry),
        "judge_tokens": tokens,
        "judge_cost_usd": cost,
        "judge_price": price,
        "judge_cost_note": cost_note,
        "heldout_preference": heldout,
        "weight_change": changes,
        "eval_set": eval_set.name,
        "eval_set_source": eval_set.source,
        "subset": eval_set.subset,
        "n_instructions": len(eval_set),
        "reference_generator": references[0] if len(references) == 1 else references,
        "generation": {**settings, **generation_info},
        "files": {
            "model_outputs": str(outputs_path),
            "annotations": str(out_dir / ANNOTATIONS_FILE),
            "metrics": str(out_dir / METRICS_FILE),
        },
    }
    write_json(out_dir / METRICS_FILE, result)
    logger.info(
        "wrote %s: WR %s, LC %s (%s), judge %s%s%s",
        out_dir / METRICS_FILE,
        result["win_rate"],
        result["length_controlled_winrate"],
        result["lc_unavailable_reason"] or result["lc_method"],
        result["judge"],
        " [weak judge: mechanism check only]" if result["weak_judge"] else "",
        f" [scores of a model equal to its init in {changes['dtype']}: {changes['note']}]"
        if changes is not None and changes["changed"] == 0
        else "",
    )
    return json.loads(json.dumps(result, default=str))
