"""Judge tokens and estimated cost per evaluated model: token counts from each judgement (the server's ``usage``,
else the judge tokenizer's count) priced with a dated table kept as data (``judge_prices.json``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PRICES_FILE = Path(__file__).with_name("judge_prices.json")


class PriceTableError(ValueError):
    """A price table that is not ``{"models": {name: {"input": USD, "output": USD, "as_of": date}}}``."""


def load_prices(path: str | Path | None = None) -> dict[str, Any]:
    """The price table (USD per 1M input/output tokens per model name), validated."""
    path = Path(path) if path is not None else PRICES_FILE
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PriceTableError(f"{path}: not valid JSON ({exc.msg})") from exc
    models = table.get("models") if isinstance(table, dict) else None
    if not isinstance(models, dict):
        raise PriceTableError(f"{path}: expected an object with 'models' mapping model name -> prices")
    for name, entry in models.items():
        ok = (
            isinstance(entry, dict)
            and all(
                isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool) and entry[k] >= 0
                for k in ("input", "output")
            )
            and isinstance(entry.get("as_of"), str)
        )
        if not ok:
            raise PriceTableError(
                f"{path}: models.{name} needs 'input' and 'output' (USD per 1M tokens, >= 0) "
                f"and 'as_of' (a date), got {entry!r}"
            )
    return table


def row_tokens(row: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens of one judgement; None when the judgement recorded no count.

    ``raw_completion.usage`` (served and local judges), an older local row's ``prompt_tokens``, or an alpaca_eval
    OpenAI row's ``total_tokens`` (counted as prompt: alpaca_eval itself prices the total at the input rate).
    """
    raw = row.get("raw_completion")
    if not isinstance(raw, dict):
        return None
    usage = raw.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        return usage["prompt_tokens"], int(usage.get("completion_tokens") or 0)
    for key in ("prompt_tokens", "total_tokens"):
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return int(value), 0
    return None


def judge_usage(annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token totals over every judgement behind a result (reused cached ones included: they were paid once).

    Rows with identical outputs were never sent to the judge and count nothing.
    """
    prompt = completion = counted = uncounted = 0
    for row in annotations:
        tokens = row_tokens(row)
        if tokens is None:
            uncounted += row.get("raw_completion") is not None
            continue
        prompt, completion, counted = prompt + tokens[0], completion + tokens[1], counted + 1
    return {
        "prompt": prompt,
        "completion": completion,
        "total": prompt + completion,
        "n_judgements": counted,
        "n_without_counts": uncounted,
    }


def judge_cost(
    tokens: dict[str, Any], price_model: str | None, prices: dict[str, Any] | None = None
) -> tuple[float | None, dict[str, Any] | None, str]:
    """(estimated USD or None, the price entry used, a short note) for ``judge_usage`` totals."""
    if price_model is None:
        return None, None, "local judge: no per-token price"
    table = prices if prices is not None else load_prices()
    entry = table["models"].get(price_model)
    if entry is None:
        return None, None, f"no price for {price_model!r} in {PRICES_FILE.name}"
    cost = (tokens["prompt"] * entry["input"] + tokens["completion"] * entry["output"]) / 1e6
    note = f"{price_model} at ${entry['input']}/${entry['output']} per 1M tokens (as of {entry['as_of']})"
    if tokens.get("n_without_counts"):
        note += f"; {tokens['n_without_counts']} judgements without token counts are not included"
    return cost, {"model": price_model, **entry}, note
