"""Per-answer scores from pairwise judgements: every two distinct answers to a prompt are judged once, in
alpaca_eval's format, through ``annotate`` and its on-disk cache (a resumed round pays for no judgement twice), and
each answer's score is its mean probability of beating the others."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.evaluate.annotate import AnnotationCache, annotate
from steps.evaluate.judges import Judge


@dataclass
class PromptAnswers:
    """The distinct answers to one prompt (``texts``, in order of first sample) and, per sample, the index of
    its text; a text shared by several samples is judged once."""

    prompt_id: str
    instruction: str
    texts: list[str] = field(default_factory=list)
    sample_text: dict[int, int] = field(default_factory=dict)

    def add(self, sample: int, text: str) -> None:
        if text not in self.texts:
            self.texts.append(text)
        self.sample_text[sample] = self.texts.index(text)


def comparisons(count: int) -> list[tuple[int, int]]:
    """Every unordered pair of ``count`` answers once, as (shown as output_1, shown as output_2).

    alpaca_eval's swap coin is seeded by the instruction alone, so it flips every pair of a prompt alike; the
    orientation here alternates with the parity of i + j so that each answer sits in each position about equally
    often and a judge's position bias does not favour the first sample.
    """
    return [(i, j) if (i + j) % 2 else (j, i) for i in range(count) for j in range(i + 1, count)]


@dataclass(frozen=True)
class PairwiseResult:
    """Scores per distinct answer (None: no usable judgement), the annotations (with ``prompt_id``, ``answer_1``
    and ``answer_2`` naming the texts compared) and how many judgements were found cached before judging."""

    scores: list[list[float | None]]
    annotations: list[dict[str, Any]]
    cached: int


def win_probability(preference: Any) -> float | None:
    """P(output_2 wins) from an alpaca_eval preference in [1, 2]; None when missing or not a number."""
    if isinstance(preference, bool) or not isinstance(preference, (int, float)) or math.isnan(preference):
        return None
    return float(preference) - 1.0


def mean_win_scores(count: int, outcomes: Sequence[tuple[int, int, float | None]]) -> list[float | None]:
    """Each answer's mean probability of beating the answers it was compared with, from (output_1, output_2,
    P(output_2 wins)) outcomes; outcomes without a probability are left out, an answer with none scores None.

    With every pair judged once this orders answers as a Bradley-Terry fit does in the usual case, needs no
    iteration and stays defined when one answer wins everything."""
    totals, counts = [0.0] * count, [0] * count
    for first, second, p_second in outcomes:
        if p_second is None:
            continue
        totals[second] += p_second
        totals[first] += 1.0 - p_second
        counts[second] += 1
        counts[first] += 1
    return [totals[i] / counts[i] if counts[i] else None for i in range(count)]


def judge_answers(groups: Sequence[PromptAnswers], judge: Judge, cache_dir: str | Path) -> PairwiseResult:
    """Judge every comparison of every prompt (one ``annotate`` call, cached in ``cache_dir``) and score answers."""
    reference_rows: list[dict[str, Any]] = []
    model_rows: list[dict[str, Any]] = []
    where: list[tuple[int, int, int]] = []
    for group_index, group in enumerate(groups):
        for first, second in comparisons(len(group.texts)):
            reference_rows.append(
                {"instruction": group.instruction, "output": group.texts[first], "generator": f"answer-{first}"}
            )
            model_rows.append(
                {"instruction": group.instruction, "output": group.texts[second], "generator": f"answer-{second}"}
            )
            where.append((group_index, first, second))
    cache = AnnotationCache(cache_dir, judge.cache_identity)
    cached = sum(
        cache.get(cache.key(ref["instruction"], ref["output"], mod["output"])) is not None
        for ref, mod in zip(reference_rows, model_rows)
    )
    annotations = annotate(model_rows, reference_rows, judge, cache_dir=cache_dir) if where else []
    outcomes: list[list[tuple[int, int, float | None]]] = [[] for _ in groups]
    for (group_index, first, second), row in zip(where, annotations):
        outcomes[group_index].append((first, second, win_probability(row.get("preference"))))
        row.update(prompt_id=groups[group_index].prompt_id, answer_1=first, answer_2=second)
    scores = [mean_win_scores(len(group.texts), outcomes[i]) for i, group in enumerate(groups)]
    return PairwiseResult(scores, annotations, cached)
