"""Judge tokens and cost: counts from each judgement, priced with the dated table in steps/evaluate/judge_prices.json;
checked against alpaca_eval's own price_per_example on the official GPT-4-Turbo annotations."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest

from steps.evaluate.judge_cost import PRICES_FILE, PriceTableError, judge_cost, judge_usage, load_prices


def test_price_table_is_dated_data():
    table = load_prices()
    assert table["currency"] == "USD" and table["unit"] == "per 1M tokens" and table["source"].startswith("https://")
    dt.date.fromisoformat(table["recorded"])
    for name, entry in table["models"].items():
        dt.date.fromisoformat(entry["as_of"])
        assert entry["input"] <= entry["output"], name
    assert table["models"]["gpt-4-1106-preview"] == {"input": 10.0, "output": 30.0, "as_of": "2023-11-06"}


def test_official_annotations_cost_what_alpaca_eval_charged(shared_dir):
    """alpaca_eval priced each official judgement at total_tokens x $0.01/1K; the table's input price agrees."""
    with open(shared_dir / "alpaca_eval" / "annotations" / "vicuna-7b-v1.5.json", encoding="utf-8") as fh:
        rows = json.load(fh)
    tokens = judge_usage(rows)
    judged = [r for r in rows if r["raw_completion"] is not None]  # 3 rows with identical outputs were not sent
    assert len(judged) == 802 and all(r["output_1"] == r["output_2"] for r in rows if r["raw_completion"] is None)
    total = sum(int(r["raw_completion"]["total_tokens"]) for r in judged)
    assert tokens == {"prompt": total, "completion": 0, "total": total, "n_judgements": 802, "n_without_counts": 0}
    cost, price, note = judge_cost(tokens, "gpt-4-1106-preview")
    assert cost == pytest.approx(math.fsum(r["price_per_example"] for r in judged), rel=1e-6)
    assert price["as_of"] == "2023-11-06" and "as of 2023-11-06" in note


def test_usage_rows_price_input_and_output_apart():
    rows = [
        {"raw_completion": {"usage": {"prompt_tokens": 1000, "completion_tokens": 1}}},
        {"raw_completion": {"usage": {"prompt_tokens": 2500, "completion_tokens": 1}}},
        {"raw_completion": None},  # identical outputs: never sent
        {"raw_completion": {"top_logprobs": []}},
    ]  # a judgement without counts
    tokens = judge_usage(rows)
    assert tokens == {"prompt": 3500, "completion": 2, "total": 3502, "n_judgements": 2, "n_without_counts": 1}
    cost, _, note = judge_cost(tokens, "gpt-4o-mini-2024-07-18")
    assert cost == pytest.approx((3500 * 0.15 + 2 * 0.6) / 1e6)
    assert "1 judgements without token counts are not included" in note
    assert judge_cost(tokens, "meta-llama/Llama-3.1-70B-Instruct")[0] is None
    assert judge_cost(tokens, None) == (None, None, "local judge: no per-token price")


@pytest.mark.parametrize(
    "models, message",
    [
        ({"m": {"input": 1.0, "output": 2.0}}, "models.m needs 'input' and 'output'"),
        ({"m": {"input": -1, "output": 2.0, "as_of": "2024-01-01"}}, "models.m needs"),
        ([], "expected an object with 'models'"),
    ],
)
def test_bad_price_table(tmp_path, models, message):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": models}))
    with pytest.raises(PriceTableError, match=message):
        load_prices(path)
    assert PRICES_FILE.is_file()
