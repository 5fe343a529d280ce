"""Accuracy of verified instruction following, with standard errors, unscored counts and a paired delta.

All numbers are percentages (0-100), like WR. Prompt level: the share of scored prompts whose instructions were
all followed; a prompt with any unscored instruction is left out (its outcome is unknown), and the binomial
s.e. sqrt(p(1-p)/n) is used. Instruction level: followed / scored instructions, pooled over prompts; its s.e.
is clustered by prompt (the linearised s.e. of a ratio of sums, sqrt(sum_i (y_i - r m_i)^2) / sum_i m_i with
y_i followed and m_i scored instructions of prompt i), because instructions of one prompt share one response
and are not independent; with one instruction per prompt it equals the binomial s.e.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from steps.evaluate.paired import PAIRED_RESAMPLES, PAIRED_SEED, bootstrap_mean_ci95
from steps.evaluate.verifiable.ifbench_prompts import IFBenchInputError
from steps.evaluate.verifiable.ifbench_scoring import MODES, PromptResult


def prompt_level(results: Sequence[PromptResult], mode: str) -> dict[str, Any]:
    """Prompt-level accuracy and binomial s.e. over the prompts whose every instruction was scored."""
    outcomes = [r.followed_all(mode) for r in results]
    scored = [o for o in outcomes if o is not None]
    n = len(scored)
    p = sum(scored) / n if n else None
    return {
        "accuracy": None if p is None else p * 100,
        "standard_error": None if p is None else math.sqrt(p * (1 - p) / n) * 100,
        "n_scored": n,
        "n_unscored": len(outcomes) - n,
    }


def instruction_level(results: Sequence[PromptResult], mode: str) -> dict[str, Any]:
    """Instruction-level accuracy over scored instructions, with the prompt-clustered s.e. (module docstring)."""
    clusters = []  # (followed, scored) per prompt with at least one scored instruction
    unscored = 0
    for result in results:
        flags = [v.followed for v in result.verdicts(mode)]
        scored = [f for f in flags if f is not None]
        unscored += len(flags) - len(scored)
        if scored:
            clusters.append((sum(scored), len(scored)))
    total = sum(m for _, m in clusters)
    if total == 0:
        return {"accuracy": None, "standard_error": None, "n_scored": 0, "n_unscored": unscored}
    ratio = sum(y for y, _ in clusters) / total
    se = math.sqrt(math.fsum((y - ratio * m) ** 2 for y, m in clusters)) / total
    return {"accuracy": ratio * 100, "standard_error": se * 100, "n_scored": total, "n_unscored": unscored}


def unscored_counts(results: Sequence[PromptResult], mode: str) -> dict[str, dict[str, int]]:
    """Unscored instructions counted by instruction type and by reason (e.g. ``missing NLTK data stopwords``)."""
    by_type: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    for result in results:
        for instruction_id, verdict in zip(result.instruction_ids, result.verdicts(mode)):
            if verdict.followed is None:
                by_type[instruction_id] += 1
                by_reason[verdict.reason or "unknown"] += 1
    return {"by_type": dict(sorted(by_type.items())), "by_reason": dict(sorted(by_reason.items()))}


def accuracy_summary(results: Sequence[PromptResult]) -> dict[str, Any]:
    """Per mode: prompt-level and instruction-level accuracy with s.e., and the unscored counts."""
    if not results:
        raise ValueError("no IFBench results to summarise")
    return {
        mode: {
            "prompt_level": prompt_level(results, mode),
            "instruction_level": instruction_level(results, mode),
            "unscored": unscored_counts(results, mode),
        }
        for mode in MODES
    }


def _by_key(results: Sequence[PromptResult], source: str) -> dict[str, PromptResult]:
    keyed: dict[str, PromptResult] = {}
    for r in results:
        if r.key in keyed:
            raise IFBenchInputError(f"{source}: prompt key {r.key!r} appears twice")
        keyed[r.key] = r
    return keyed


def paired_accuracy_delta(
    results: Sequence[PromptResult],
    baseline_results: Sequence[PromptResult],
    *,
    mode: str = "strict",
    seed: int = PAIRED_SEED,
    resamples: int = PAIRED_RESAMPLES,
    source: str = "results",
    baseline_source: str = "baseline results",
) -> dict[str, Any]:
    """Model A's prompt-level accuracy minus the baseline's on the prompts scored for both, with WR's bootstrap.

    ``delta`` = mean over shared scored prompts of (A followed all - B followed all) x 100; ``ci95`` its 95 %
    percentile bootstrap interval (steps.evaluate.paired.bootstrap_mean_ci95: same seed, resamples and RNG as
    the WR delta); ``distinguishable`` whether it excludes 0. Prompts are paired by key and must carry the same
    instructions in both (else the two were scored on different benchmark versions and the call fails).
    """
    a, b = _by_key(results, source), _by_key(baseline_results, baseline_source)
    shared = [key for key in a if key in b]
    mismatched = [key for key in shared if a[key].instruction_ids != b[key].instruction_ids]
    if mismatched:
        raise IFBenchInputError(
            f"{source} and {baseline_source}: prompt {mismatched[0]!r} has different instructions in each; "
            f"compare results scored on the same IFBench prompt set"
        )
    differences = []
    for key in shared:
        mine, theirs = a[key].followed_all(mode), b[key].followed_all(mode)
        if mine is not None and theirs is not None:
            differences.append(float(mine) - float(theirs))
    if not differences:
        raise IFBenchInputError(f"{source} and {baseline_source} share no prompt scored in both ({mode})")
    n = len(differences)
    low, high = bootstrap_mean_ci95(differences, seed=seed, resamples=resamples)
    mean = math.fsum(differences) / n
    se = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1) / n) if n > 1 else None
    return {
        "mode": mode,
        "delta": mean * 100,
        "ci95": [low * 100, high * 100],
        "standard_error": None if se is None else se * 100,
        "n": n,
        "n_unpaired": len(a) + len(b) - 2 * len(shared),
        "n_unscored_in_either": len(shared) - n,
        "distinguishable": bool(low > 0 or high < 0),
        "bootstrap": {"method": "percentile", "resamples": resamples, "seed": seed, "rng": "numpy PCG64"},
    }
