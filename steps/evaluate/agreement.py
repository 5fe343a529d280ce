"""How often a judge picks the same winner as official alpaca_eval annotations of the same pairs."""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from steps.evaluate.annotate import annotate
from steps.evaluate.judges import Judge


def judge_agreement(official: Sequence[dict[str, Any]], judge: Judge, limit: int | None = 30,
                    cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """How often ``judge`` picks the same winner as the official annotations (ties on either side excluded)."""
    rows = [r for r in official[:limit] if r.get("preference") is not None]
    model_outputs = [{"instruction": r["instruction"], "output": r["output_2"], "generator": r["generator_2"]}
                     for r in rows]
    reference_outputs = [{"instruction": r["instruction"], "output": r["output_1"], "generator": r["generator_1"]}
                         for r in rows]
    started = time.monotonic()
    mine = annotate(model_outputs, reference_outputs, judge, cache_dir=cache_dir)
    elapsed = time.monotonic() - started
    compared = agree = ties = 0
    for theirs, ours in zip(rows, mine):
        a, b = float(theirs["preference"]) - 1.5, (ours["preference"] or 1.5) - 1.5
        if a == 0 or b == 0:
            ties += 1
            continue
        compared += 1
        agree += (a > 0) == (b > 0)
    judged = [r for r in mine if (r.get("time_per_example") or 0) > 0]
    return {
        "judge": judge.label,
        "weak_judge": judge.weak_judge,
        "official_annotator": rows[0].get("annotator") if rows else None,
        "n_rows": len(rows),
        "n_compared": compared,
        "n_ties_excluded": ties,
        "n_agree": agree,
        "agreement": agree / compared if compared else None,
        "official_model_win_fraction": sum(float(r["preference"]) > 1.5 for r in rows) / len(rows) if rows else None,
        "judge_model_win_fraction": sum((r["preference"] or 1.5) > 1.5 for r in mine) / len(mine) if mine else None,
        "seconds_per_judgement": (sum(r["time_per_example"] for r in judged) / len(judged)) if judged else None,
        "wall_seconds": elapsed,
    }
