"""IFBench on one model in the evaluate step: answer the selected prompts the way the AlpacaEval answers are made
(same generation settings, backend, dtype and loaded model), score them with the package's verifiers offline,
write the responses and per-prompt results, and return the typed :class:`VerifiableResult`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.evaluate.generation import answer_instructions
from steps.evaluate.results import Accuracy, VerifiableFiles, VerifiableResult
from steps.evaluate.settings import GenerationSettings
from steps.io import write_json, write_jsonl

if TYPE_CHECKING:
    from steps.evaluate.evaluation import EvalContext
    from steps.evaluate.verifiable.ifbench import IFBench, IFBenchScore

logger = logging.getLogger(__name__)

IFBENCH_RESPONSES_FILE = "ifbench_responses.jsonl"
IFBENCH_RESULTS_FILE = "ifbench_results.json"


def evaluate_ifbench(
    model_spec: str,
    limit: int | None,
    generation: GenerationSettings,
    context: EvalContext,
) -> VerifiableResult:
    """IFBench's type-balanced first ``limit`` prompts (None: all 294) answered by ``model_spec`` (or
    ``context.run.model``) with ``generation``, scored; ``ifbench_responses.jsonl`` and ``ifbench_results.json``
    written to ``context.out_dir``."""
    from steps.evaluate.verifiable.ifbench import load_ifbench, score_ifbench

    bench = load_ifbench(limit=limit)
    responses, info = answer_ifbench(model_spec, bench, generation, context)
    out_dir = Path(context.out_dir)
    files = VerifiableFiles(str(out_dir / IFBENCH_RESPONSES_FILE), str(out_dir / IFBENCH_RESULTS_FILE))
    write_jsonl(files.responses, responses)
    logger.info("wrote %d IFBench responses to %s", len(responses), files.responses)
    scored = score_ifbench(bench, responses, source=files.responses)
    write_json(files.results, scored.to_json())
    result = verifiable_result(scored, {**generation.record(), **info}, files)
    strict = result.prompt_strict
    logger.info(
        "wrote %s: IFBench prompt-level strict %s ± %s (%d of %d prompts scored; %d unverifiable offline)",
        files.results,
        _pct(strict.accuracy),
        _pct(strict.standard_error),
        strict.n_scored,
        result.n_prompts,
        strict.n_unscored,
    )
    return result


def answer_ifbench(
    model_spec: str, bench: IFBench, generation: GenerationSettings, context: EvalContext
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One ``{key, prompt, response, generator}`` record per selected prompt (batched, as the AlpacaEval answers),
    and how they were made (backend, dtype, process, speed)."""
    prompts = [p.prompt for p in bench.prompts]
    records, info = answer_instructions(model_spec, prompts, context.generator, generation, context.run)
    responses = [
        {"key": p.key, "prompt": p.prompt, "response": r["output"], "generator": r["generator"]}
        for p, r in zip(bench.prompts, records)
    ]
    return responses, info


def verifiable_result(scored: IFBenchScore, generation: dict[str, Any], files: VerifiableFiles) -> VerifiableResult:
    """The typed result of one scored IFBench run."""
    summary = scored.summary
    return VerifiableResult(
        benchmark="IFBench",
        prompt_strict=Accuracy.of(summary["strict"]["prompt_level"]),
        prompt_loose=Accuracy.of(summary["loose"]["prompt_level"]),
        instruction_strict=Accuracy.of(summary["strict"]["instruction_level"]),
        instruction_loose=Accuracy.of(summary["loose"]["instruction_level"]),
        n_prompts=len(scored.results),
        generation=generation,
        provenance=scored.provenance,
        files=files,
        scoring_seconds=round(scored.seconds, 3),
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} %"
