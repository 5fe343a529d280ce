"""The join's paired IFBench comparison: each row's prompt-level strict accuracy minus the baseline row's on the
prompts both scored, with the same seeded paired bootstrap as the win-rate difference."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from steps.evaluate.results import PairedVs, VariantResult, VerifiableResult

if TYPE_CHECKING:
    from steps.config import EvaluationConfig
    from steps.evaluate.verifiable.ifbench_scoring import PromptResult

logger = logging.getLogger(__name__)

#: The accuracy the Δ is taken on: prompt level (every instruction of a prompt followed), strict.
PAIRED_MODE = "strict"


def read_prompt_results(result: VerifiableResult) -> list[PromptResult]:
    """The per-prompt results an evaluation wrote (``ifbench_results.json``)."""
    from steps.evaluate.verifiable.ifbench_scoring import prompt_result_from_record
    from steps.io import read_json

    path = result.files.results
    records = read_json(path)["results"]
    return [prompt_result_from_record(r, f"{path} result {i}") for i, r in enumerate(records)]


def add_paired_ifbench(rows: Sequence[VariantResult], evaluation: EvaluationConfig) -> list[VariantResult]:
    """``rows`` with ``paired_ifbench`` set against ``evaluation.paired_baseline`` where both have IFBench results
    (the baseline row marked as such; a row that cannot be paired says why)."""
    from steps.evaluate.verifiable.accuracy import paired_accuracy_delta
    from steps.evaluate.verifiable.ifbench_prompts import IFBenchInputError

    name = evaluation.paired_baseline
    base = next((r for r in rows if r.variant == name and r.evaluation.ifbench is not None), None)
    if name is None or base is None or base.evaluation.ifbench is None:
        return list(rows)
    base_results = read_prompt_results(base.evaluation.ifbench)  # read once
    out = []
    for row in rows:
        scored = row.evaluation.ifbench
        if row is base:
            paired: PairedVs | None = PairedVs(name, is_baseline=True)
        elif scored is None:
            paired = None
        elif refusal := _refusal(row, base, name):
            logger.warning("%s: no paired IFBench comparison: %s", row.variant, refusal)
            paired = PairedVs(name, unavailable=refusal)
        else:
            try:
                comparison = paired_accuracy_delta(
                    read_prompt_results(scored),
                    base_results,
                    mode=PAIRED_MODE,
                    seed=evaluation.paired_seed,
                    resamples=evaluation.paired_resamples,
                    source=scored.files.results,
                    baseline_source=base.evaluation.ifbench.files.results,
                )
                paired = PairedVs(name, comparison=comparison)
            except IFBenchInputError as exc:  # different prompt sets, or no prompt scored in both: n/a, and why
                logger.warning("%s: no paired IFBench comparison with %s: %s", row.variant, name, exc)
                paired = PairedVs(name, unavailable=str(exc))
        out.append(dataclasses.replace(row, paired_ifbench=paired))
    return out


def _refusal(row: VariantResult, base: VariantResult, name: str) -> str | None:
    """Why the row's answers were made otherwise than the baseline's (decoding, dtype, benchmark versions)."""
    from steps.evaluate.provenance import benchmark_pairing_refusal

    mine, theirs = row.evaluation.alpaca_eval, base.evaluation.alpaca_eval
    if mine is None or theirs is None:
        return None
    return benchmark_pairing_refusal(mine.provenance, theirs.provenance, name)
