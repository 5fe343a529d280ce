"""Pair model outputs with reference outputs in alpaca_eval's annotation schema and judge them, reusing
judgements from an append-only on-disk cache so a rerun or a crash never pays for the same judgement twice."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steps.evaluate.judges.base import Judge
from steps.io import append_jsonl, iter_jsonl

logger = logging.getLogger(__name__)


class AnnotationInputError(ValueError):
    """Model and reference outputs that cannot be paired (different lengths or instructions)."""


class AnnotationCache:
    """Append-only JSONL of judgements for one judge; one line per judgement, fsynced as it is made.

    Keyed by sha256 of (judge identity, instruction, output_1, output_2). Lines are appended under a file lock
    (parallel evaluate steps share the file) in one write each; a line torn by a kill is closed off by the next
    append and skipped on load (that one judgement is simply made again).
    """

    def __init__(self, cache_dir: str | os.PathLike, judge_identity: str):
        self.judge_identity = judge_identity
        digest = hashlib.sha256(judge_identity.encode("utf-8")).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", judge_identity)[:60]
        self.path = Path(cache_dir) / f"{slug}-{digest}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            bad = 0
            for row in iter_jsonl(self.path, skip_bad_lines=True):
                if isinstance(row.get("key"), str) and isinstance(row.get("result"), dict):
                    self._entries[row["key"]] = row["result"]
                else:
                    bad += 1
            if bad:
                logger.warning("%s: %d cache line(s) without a key and a result skipped", self.path, bad)
            logger.info("annotation cache %s: %d judgements", self.path, len(self._entries))

    def key(self, instruction: str, output_1: str, output_2: str) -> str:
        payload = json.dumps([self.judge_identity, instruction, output_1, output_2], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, result: dict[str, Any]) -> None:
        append_jsonl(self.path, {"key": key, "result": result}, lock=True)
        self._entries[key] = result

    def __len__(self) -> int:
        return len(self._entries)


def pair_outputs(
    model_outputs: Sequence[dict[str, Any]], reference_outputs: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """alpaca_eval rows (output_1 = reference, output_2 = model), paired by position; instructions must match."""
    if len(model_outputs) != len(reference_outputs):
        raise AnnotationInputError(
            f"{len(model_outputs)} model outputs but {len(reference_outputs)} reference "
            f"outputs; both must cover the same instructions in the same order"
        )
    rows = []
    for index, (model_row, ref_row) in enumerate(zip(model_outputs, reference_outputs)):
        for side, row in (("model", model_row), ("reference", ref_row)):
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("instruction"), str)
                or not isinstance(row.get("output"), str)
            ):
                raise AnnotationInputError(
                    f"{side} output {index} needs string 'instruction' and 'output' fields, got {str(row)[:200]}"
                )
        if model_row["instruction"] != ref_row["instruction"]:
            raise AnnotationInputError(
                f"row {index}: model and reference instructions differ ({model_row['instruction'][:80]!r} vs "
                f"{ref_row['instruction'][:80]!r}); outputs are paired by position, so both files must follow "
                f"the eval set's order"
            )
        row = {
            "instruction": ref_row["instruction"],
            "output_1": ref_row["output"],
            "generator_1": ref_row.get("generator", "reference"),
            "output_2": model_row["output"],
            "generator_2": model_row.get("generator", "model"),
        }
        dataset = ref_row.get("dataset", model_row.get("dataset"))
        if dataset is not None:
            row["dataset"] = dataset
        rows.append(row)
    return rows


def annotate(
    model_outputs: Sequence[dict[str, Any]],
    reference_outputs: Sequence[dict[str, Any]],
    judge: Judge,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Judge the model's outputs against the reference outputs, row by row, in alpaca_eval's annotation schema.

    Identical outputs get 1.5 without a judgement. With ``cache_dir``, earlier judgements are reused and each new
    one is written as soon as it is made.
    """
    rows = pair_outputs(model_outputs, reference_outputs)
    cache = AnnotationCache(cache_dir, judge.cache_identity) if cache_dir is not None else None
    results: list[dict[str, Any] | None] = [None] * len(rows)
    pending: list[int] = []
    n_cached = n_identical = 0
    for index, row in enumerate(rows):
        if row["output_1"] == row["output_2"]:
            results[index] = {
                "preference": 1.5,
                "raw_completion": None,
                "time_per_example": 0.0,
                "price_per_example": 0.0,
            }
            n_identical += 1
            continue
        cached = cache.get(cache.key(row["instruction"], row["output_1"], row["output_2"])) if cache else None
        if cached is not None:
            results[index] = cached
            n_cached += 1
        else:
            pending.append(index)
    logger.info(
        "annotate with %s: %d rows, %d identical, %d cached, %d to judge",
        judge.label,
        len(rows),
        n_identical,
        n_cached,
        len(pending),
    )

    def on_result(position: int, result: dict[str, Any]) -> None:
        index = pending[position]
        row = rows[index]
        if cache is not None:
            cache.put(cache.key(row["instruction"], row["output_1"], row["output_2"]), result)
        results[index] = result

    if pending:
        judge.judge_pairs([rows[i] for i in pending], on_result)
    annotations = []
    for row, result in zip(rows, results):
        record = dict(row)
        record["annotator"] = judge.label
        if result is None:
            record["preference"] = None
        else:
            record.update(result)
            record["annotator"] = judge.label
        annotations.append(record)
    missing = sum(r["preference"] is None for r in annotations)
    if missing:
        logger.warning("%d of %d rows have no judgement", missing, len(annotations))
    return annotations
