"""How often a judge picks the same winner as reference annotations of the same pairs, and a small dated registry
of those measurements (keyed by judge identity, annotations file and limit) that results are labelled with."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steps.evaluate.annotate import annotate
from steps.evaluate.judges.base import Judge
from steps.io import write_json
from steps.locks import file_lock
from steps.models.cache import cache_dir

logger = logging.getLogger(__name__)

#: Overrides where the registry lives (default: ``<prefflow cache>/judge_agreement.json``).
REGISTRY_ENV = "PREFFLOW_AGREEMENT_REGISTRY"
REGISTRY_SCHEMA = 1


class AgreementRegistryError(ValueError):
    """A registry file that is not a PrefFlow agreement registry."""


def judge_agreement(
    official: Sequence[dict[str, Any]], judge: Judge, limit: int | None = 30, cache_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """How often ``judge`` picks the same winner as the official annotations (ties on either side excluded)."""
    rows = [r for r in official[:limit] if r.get("preference") is not None]
    model_outputs = [
        {"instruction": r["instruction"], "output": r["output_2"], "generator": r["generator_2"]} for r in rows
    ]
    reference_outputs = [
        {"instruction": r["instruction"], "output": r["output_1"], "generator": r["generator_1"]} for r in rows
    ]
    started = time.monotonic()
    mine = annotate(model_outputs, reference_outputs, judge, cache_dir=cache_dir)
    elapsed = time.monotonic() - started
    compared = agree = ties = official_wins = judge_wins = 0
    for theirs, ours in zip(rows, mine):
        a, b = float(theirs["preference"]) - 1.5, _preference(ours) - 1.5
        if a == 0 or b == 0:
            ties += 1
            continue
        compared += 1
        agree += (a > 0) == (b > 0)
        official_wins += a > 0
        judge_wins += b > 0
    # agreement by chance alone: a judge that always names the officials' usual winner, and Cohen's kappa
    baseline: float | None = None
    kappa: float | None = None
    if compared:
        p_official, p_judge = official_wins / compared, judge_wins / compared
        baseline = max(p_official, 1 - p_official)
        expected = p_official * p_judge + (1 - p_official) * (1 - p_judge)
        kappa = (agree / compared - expected) / (1 - expected) if expected < 1 else None
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
        "majority_baseline_agreement": baseline,
        "cohens_kappa": kappa,
        "official_model_win_fraction": sum(float(r["preference"]) > 1.5 for r in rows) / len(rows) if rows else None,
        "judge_model_win_fraction": sum(_preference(r) > 1.5 for r in mine) / len(mine) if mine else None,
        "seconds_per_judgement": (sum(r["time_per_example"] for r in judged) / len(judged)) if judged else None,
        "wall_seconds": elapsed,
    }


def _preference(row: dict[str, Any]) -> float:
    """A row's preference with missing or NaN read as a tie (a judge that gave no answer agrees with no one)."""
    value = row.get("preference")
    return 1.5 if value is None or value != value else float(value)


# -- the registry ---------------------------------------------------------------------------------------------


def registry_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$PREFFLOW_AGREEMENT_REGISTRY``, else ``judge_agreement.json`` in the PrefFlow cache."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(REGISTRY_ENV) or cache_dir() / "judge_agreement.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identity(judge: Judge | str) -> str:
    return judge if isinstance(judge, str) else judge.cache_identity


def registry_key(judge: Judge | str, annotations_sha256: str, limit: int | None) -> str:
    """One measurement per (judge cache identity, annotations file content, limit)."""
    return f"{_identity(judge)}|annotations_sha256={annotations_sha256[:16]}|limit={limit}"


def read_registry(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The registry's ``{"schema", "entries"}``; an empty one when the file does not exist."""
    path = registry_path(path)
    if not path.exists():
        return {"schema": REGISTRY_SCHEMA, "entries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AgreementRegistryError(
            f"{path}: not valid JSON ({exc.msg}); delete it to start a new registry, or point {REGISTRY_ENV} elsewhere"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise AgreementRegistryError(
            f"{path}: expected an object with 'entries' (a PrefFlow judge agreement "
            f"registry); delete it or point {REGISTRY_ENV} elsewhere"
        )
    return data


def record_agreement(
    result: dict[str, Any],
    judge: Judge,
    annotations_path: str | os.PathLike,
    limit: int | None,
    path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Store one ``judge_agreement`` result, dated, replacing an earlier one with the same key; returns the entry."""
    annotations_path = Path(annotations_path)
    sha = _sha256(annotations_path)
    entry = {
        "judge": judge.label,
        "judge_identity": judge.cache_identity,
        "weak_judge": judge.weak_judge,
        "annotations": str(annotations_path.resolve()),
        "annotations_name": annotations_path.name,
        "annotations_sha256": sha,
        "limit": limit,
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **{
            k: result.get(k)
            for k in (
                "agreement",
                "majority_baseline_agreement",
                "cohens_kappa",
                "n_agree",
                "n_compared",
                "n_ties_excluded",
                "n_rows",
                "official_annotator",
                "seconds_per_judgement",
            )
        },
    }
    target = registry_path(path)
    with file_lock(target.with_name(target.name + ".lock"), "agreement registry"):
        data = read_registry(target)
        data["schema"] = REGISTRY_SCHEMA
        data["entries"][registry_key(judge, sha, limit)] = entry
        write_json(target, data)
    logger.info(
        "recorded agreement %s of %s on %s (limit %s) in %s",
        entry["agreement"],
        judge.label,
        annotations_path.name,
        limit,
        target,
    )
    return entry


def recorded_agreement(judge: Judge | str, path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The latest registry entry measured with this judge (same cache identity), or None.

    ``n_measurements`` says how many entries the judge has (other annotation files or limits). An unreadable
    registry gives None and a warning: this labels results, it must never stop an evaluation.
    """
    try:
        entries = read_registry(path)["entries"]
    except (AgreementRegistryError, OSError) as exc:
        logger.warning("judge agreement not attached: %s", exc)
        return None
    identity = _identity(judge)
    mine = [e for e in entries.values() if isinstance(e, dict) and e.get("judge_identity") == identity]
    if not mine:
        return None
    # latest by date; within one second, the one written last (entries keep the order they were written in)
    latest = max(enumerate(mine), key=lambda item: (str(item[1].get("measured_at", "")), item[0]))[1]
    return {**latest, "n_measurements": len(mine)}
