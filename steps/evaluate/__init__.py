"""AlpacaEval 2 evaluation: generate answers, judge them against reference answers, score WR and LC WR.

``evaluate_model`` is the one call the flow makes; the pieces live in ``eval_sets`` (what to answer),
``generation`` (answering), ``judges`` (pairwise judgements, cached) and ``scoring`` (alpaca_eval's metrics,
with the LC method always named). Every result records its judge; the offline default judge (the embedded
135M model) is a smoke test of the mechanism, not a quality signal, and says so (``weak_judge``).
"""
from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from steps.evaluate.eval_sets import EvalSet, EvalSetError, load_eval_set
from steps.evaluate.generation import generate_outputs, resolve_backend, resolve_device
from steps.evaluate.judges import (
    DEFAULT_JUDGE,
    AnnotationInputError,
    Judge,
    JudgeError,
    annotate,
    make_judge,
)
from steps.evaluate.scoring import score
from steps.io import read_json, write_json
from steps.models import DEFAULT_MODEL

logger = logging.getLogger(__name__)

__all__ = [
    "EvalSet", "EvalSetError", "load_eval_set", "generate_outputs", "make_judge", "Judge", "JudgeError",
    "AnnotationInputError", "annotate", "score", "evaluate_model", "reference_outputs_for", "DEFAULT_MODEL",
]

MODEL_OUTPUTS_FILE = "model_outputs.json"
ANNOTATIONS_FILE = "annotations.json"
METRICS_FILE = "metrics.json"
GENERATION_FILE = "generation.json"


def _generation_settings(batch_size: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                         do_sample: bool | None) -> dict[str, Any]:
    return {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "top_p": top_p, "seed": seed, "do_sample": temperature > 0 if do_sample is None else do_sample}


def _generate_for(model_spec: str, eval_set: EvalSet, generator: str, settings: dict[str, Any], *, backend: str,
                  device: str, dtype: str, model: Any, tokenizer: Any, show_progress: bool
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Outputs for every instruction of the eval set, and how they were made (backend, speed)."""
    from steps.models import load_model, load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_spec)
    chosen = resolve_backend(backend, model if model is not None else model_spec)
    if model is None:
        model = model_spec if chosen == "vllm" else load_model(model_spec, dtype=dtype, device=resolve_device(device))
    started = time.monotonic()
    records = generate_outputs(
        model, tokenizer, eval_set.instructions, generator=generator,
        datasets=[r.get("dataset") for r in eval_set.records], backend=chosen, show_progress=show_progress,
        **{k: settings[k] for k in ("batch_size", "max_new_tokens", "temperature", "top_p", "seed", "do_sample")},
    )
    elapsed = time.monotonic() - started
    info = {"backend": chosen, "seconds": elapsed, "prompts_per_second": len(records) / elapsed if elapsed else None}
    return records, info


def reference_outputs_for(
    eval_set: EvalSet,
    starting_model_spec: str = DEFAULT_MODEL,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.9,
    top_p: float = 1.0,
    seed: int = 1814,
    do_sample: bool | None = None,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    model: Any = None,
    tokenizer: Any = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """The eval set's own reference outputs when it has them, else the starting model's answers.

    Generated references are named ``reference:<spec>`` so no result can pass them off as AlpacaEval's.
    """
    if eval_set.has_outputs:
        return [{"instruction": r["instruction"], "output": r["output"], "generator": r.get("generator"),
                 **({"dataset": r["dataset"]} if r.get("dataset") is not None else {})} for r in eval_set.records]
    settings = _generation_settings(batch_size, max_new_tokens, temperature, top_p, seed, do_sample)
    records, info = _generate_for(starting_model_spec, eval_set, f"reference:{starting_model_spec}", settings,
                                  backend=backend, device=device, dtype=dtype, model=model, tokenizer=tokenizer,
                                  show_progress=show_progress)
    logger.info("generated %d reference outputs with %s (%s, %.2f prompts/s)", len(records), starting_model_spec,
                info["backend"], info["prompts_per_second"] or 0.0)
    return records


def evaluate_model(
    model_spec: str,
    eval_set: EvalSet,
    reference_outputs: list[dict[str, Any]],
    *,
    generator: str,
    out_dir: str | Path,
    judge_name: str = DEFAULT_JUDGE,
    judge_model: str = DEFAULT_MODEL,
    judge_kwargs: dict[str, Any] | None = None,
    judge_max_chars: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.9,
    top_p: float = 1.0,
    seed: int = 1814,
    do_sample: bool | None = None,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    lc_assets_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    model: Any = None,
    tokenizer: Any = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Generate with ``model_spec``, judge against ``reference_outputs``, score; write the three files.

    The judge is made and checked first, so a missing API key fails before any generation. Outputs already in
    ``out_dir`` from the same model, instructions and settings are reused (a retried step does not generate
    again); judgements are reused through ``cache_dir``. Returns the metrics plus what produced them.
    """
    out_dir = Path(out_dir)
    if len(reference_outputs) != len(eval_set):
        raise AnnotationInputError(f"{len(reference_outputs)} reference outputs for {len(eval_set)} instructions "
                                   f"of eval set {eval_set.name}")
    judge_options = {"judge_model": judge_model, "device": device, "show_progress": show_progress,
                     "max_output_chars": judge_max_chars, **(judge_kwargs or {})}
    judge = make_judge(judge_name, **judge_options)
    judge.check()

    settings = _generation_settings(batch_size, max_new_tokens, temperature, top_p, seed, do_sample)
    generation_record = {"model": model_spec, "generator": generator, "eval_set": eval_set.name,
                         "instructions": eval_set.instructions, **settings}
    outputs_path, generation_path = out_dir / MODEL_OUTPUTS_FILE, out_dir / GENERATION_FILE
    model_outputs: list[dict[str, Any]] | None = None
    if outputs_path.is_file() and generation_path.is_file():
        previous = read_json(generation_path)
        if {k: previous.get(k) for k in generation_record} == generation_record:
            model_outputs = read_json(outputs_path)
            generation_info = previous.get("info", {})
            logger.info("reusing %d outputs from %s (same model, instructions and settings)", len(model_outputs),
                        outputs_path)
    if model_outputs is None:
        model_outputs, generation_info = _generate_for(model_spec, eval_set, generator, settings, backend=backend,
                                                       device=device, dtype=dtype, model=model,
                                                       tokenizer=tokenizer, show_progress=show_progress)
        write_json(outputs_path, model_outputs)
        write_json(generation_path, {**generation_record, "info": generation_info})
        logger.info("wrote %s", outputs_path)
    model = None  # free the policy before the judge model loads
    gc.collect()

    annotations = annotate(model_outputs, reference_outputs, judge, cache_dir=cache_dir)
    write_json(out_dir / ANNOTATIONS_FILE, annotations)
    logger.info("wrote %s", out_dir / ANNOTATIONS_FILE)

    metrics = score(annotations, lc_assets_dir=lc_assets_dir, subset=eval_set.subset,
                    alpaca_eval_order=eval_set.alpaca_eval_order, source=str(out_dir / ANNOTATIONS_FILE))
    references = sorted({str(r.get("generator")) for r in reference_outputs})
    result = {
        **metrics,
        "model": model_spec,
        "generator": generator,
        **judge.metadata(),
        "eval_set": eval_set.name,
        "eval_set_source": eval_set.source,
        "subset": eval_set.subset,
        "n_instructions": len(eval_set),
        "reference_generator": references[0] if len(references) == 1 else references,
        "generation": {**settings, **generation_info},
        "files": {"model_outputs": str(outputs_path), "annotations": str(out_dir / ANNOTATIONS_FILE),
                  "metrics": str(out_dir / METRICS_FILE)},
    }
    write_json(out_dir / METRICS_FILE, result)
    logger.info("wrote %s: WR %.2f, LC %s (%s), judge %s%s", out_dir / METRICS_FILE, result["win_rate"],
                result["length_controlled_winrate"], result["lc_method"], result["judge"],
                " [weak judge: mechanism check only]" if result["weak_judge"] else "")
    return json.loads(json.dumps(result, default=str))
