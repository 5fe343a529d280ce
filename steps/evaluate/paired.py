"""Paired comparison of two models judged on the same instructions against the same reference: the mean
per-instruction win difference with a seeded 95 % percentile bootstrap interval (deterministic)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from steps.evaluate.scoring import AnnotationsError

#: Bootstrap resamples of the shared instructions; the interval's ends move by well under 0.1 point between seeds.
PAIRED_RESAMPLES = 10_000
PAIRED_SEED = 0
#: Resamples drawn per numpy call (bounds memory at 805 instructions to ~6 MB of indices).
_CHUNK = 1_000


def _win(preference: Any) -> float | None:
    """alpaca_eval's win in [0, 1]: ``preference - 1``, a draw coded 0 counting as 0.5; missing or NaN is None."""
    if preference is None or isinstance(preference, bool) or not isinstance(preference, (int, float)):
        return None
    value = float(preference)
    if math.isnan(value):
        return None
    if value == 0.0:
        value = 1.5
    if not 1.0 <= value <= 2.0:
        raise AnnotationsError(f"preference {preference} is outside [1, 2] (1 = reference wins, 2 = model wins)")
    return value - 1.0


def _check_resamples(resamples: int) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples!r}")


def bootstrap_mean_ci95(
    differences: Sequence[float], *, seed: int = PAIRED_SEED, resamples: int = PAIRED_RESAMPLES
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of paired ``differences`` (one per shared item).

    Each resample draws len(differences) indices with replacement from numpy's PCG64 seeded with ``seed``; the
    interval is the 2.5th and 97.5th percentile of the resampled means. Shared by every paired delta
    (WR here, IFBench accuracy in steps.evaluate.verifiable), so one seed means the same resamples everywhere.
    """
    import numpy as np

    _check_resamples(resamples)
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("a bootstrap interval needs at least one paired difference")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        means[start : start + count] = d[rng.integers(0, n, size=(count, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _keyed(rows: Sequence[dict[str, Any]], source: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Rows by (instruction, occurrence): an instruction asked twice pairs first with first, second with second."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise AnnotationsError(f"{source}: expected a non-empty list of annotation records")
    seen: Counter[str] = Counter()
    keyed = {}
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or "preference" not in row:
            raise AnnotationsError(f"{source}: record {index} needs a string 'instruction' and a 'preference'")
        keyed[(row["instruction"], seen[row["instruction"]])] = row
        seen[row["instruction"]] += 1
    return keyed


def paired_comparison(
    annotations: Sequence[dict[str, Any]],
    baseline_annotations: Sequence[dict[str, Any]],
    *,
    seed: int = PAIRED_SEED,
    resamples: int = PAIRED_RESAMPLES,
    source: str = "annotations",
    baseline_source: str = "baseline annotations",
) -> dict[str, Any]:
    """Model A (``annotations``) minus model B (``baseline_annotations``) on the instructions both were judged on.

    ``paired_delta_wr`` = mean over shared instructions of (A's win - B's win) x 100, a win being
    ``preference - 1``; ``paired_ci95`` its 95 % percentile bootstrap interval (``resamples`` resamples of the
    shared instructions, drawn by numpy's PCG64 from ``seed``); ``distinguishable`` is whether the interval
    excludes 0. Both files must judge against the same reference answers (``output_1``), else the difference
    mixes two references and the call fails.
    """
    import numpy as np

    _check_resamples(resamples)
    a, b = _keyed(annotations, source), _keyed(baseline_annotations, baseline_source)
    shared = [key for key in a if key in b]
    if not shared:
        raise AnnotationsError(
            f"{source} and {baseline_source} share no instruction; a paired comparison needs "
            f"both models judged on the same instructions"
        )
    differences = []
    for key in shared:
        row_a, row_b = a[key], b[key]
        if row_a.get("output_1") != row_b.get("output_1"):
            raise AnnotationsError(
                f"instruction {key[0][:80]!r}: the two files judge against different reference answers "
                f"({row_a.get('generator_1')!r} vs {row_b.get('generator_1')!r}); compare models scored against "
                f"the same reference"
            )
        win_a, win_b = _win(row_a["preference"]), _win(row_b["preference"])
        if win_a is not None and win_b is not None:
            differences.append(win_a - win_b)
    n = len(differences)
    if n == 0:
        raise AnnotationsError(f"{source} and {baseline_source}: no shared instruction has a judgement in both")
    delta = math.fsum(differences) / n * 100
    low, high = (v * 100 for v in bootstrap_mean_ci95(differences, seed=seed, resamples=resamples))
    standard_error = float(np.std(differences, ddof=1) / math.sqrt(n) * 100) if n > 1 else None
    generator = next(iter(a.values())).get("generator_2")
    baseline_generator = next(iter(b.values())).get("generator_2")
    return {
        "paired_delta_wr": delta,
        "paired_ci95": [low, high],
        "paired_n": n,
        "paired_standard_error": standard_error,
        "distinguishable": bool(low > 0 or high < 0),
        "paired_generator": generator,
        "paired_baseline_generator": baseline_generator,
        "paired_n_unpaired": len(a) + len(b) - 2 * len(shared),
        "paired_n_missing_judgement": len(shared) - n,
        "paired_bootstrap": {"method": "percentile", "resamples": resamples, "seed": seed, "rng": "numpy PCG64"},
    }
