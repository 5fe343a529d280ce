"""The join's view of on-policy rounds: each round's row compared, pair by pair on the same instructions, with the
model the round started from (round r with round r-1; round 1 with the row whose model it started from, the SFT
row when it started from SFT)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steps.config import EvaluationConfig
    from steps.evaluate import VariantResult
    from steps.results import TrainResult


def previous_row(row: VariantResult, rows: list[VariantResult], init_of: dict[str, str]) -> VariantResult | None:
    """The row of the model ``row``'s round started from (None: not a round, or that model has no row)."""
    ev = row.evaluation
    if ev.round is None:
        return None
    if ev.round > 1:
        return next(
            (r for r in rows if r.evaluation.round_of == ev.round_of and r.evaluation.round == ev.round - 1), None
        )
    start = init_of.get(row.variant)
    return next((r for r in rows if r.evaluation.round is None and r.evaluation.model_dir == start), None)


def add_previous_round(
    rows: list[VariantResult], summaries: list[TrainResult], evaluation: EvaluationConfig
) -> list[VariantResult]:
    """``rows`` (in the order of ``summaries``, their training results) with ``paired_previous`` on every round's
    row whose previous model was evaluated: the join's own paired comparison (steps.pipeline._add_paired) with
    that row as the baseline."""
    from steps.pipeline import _add_paired

    init_of = {row.variant: summary.init for row, summary in zip(rows, summaries)}
    out = []
    for row in rows:
        before = previous_row(row, rows, init_of)
        if before is None or before.evaluation.alpaca_eval is None:
            out.append(row)
            continue
        against = dataclasses.replace(evaluation, paired_baseline=before.variant)
        compared = _add_paired([before, row], against)[1]
        out.append(dataclasses.replace(row, paired_previous=compared.paired_vs))
    return out
