"""Eval sets: the embedded set, local files (order, prefixes, errors) and the offline Hub error."""

from __future__ import annotations

import json

import pytest

from steps.evaluate.eval_sets import EMBEDDED_DATASET, EvalSetError, load_eval_set


def test_embedded_set():
    eval_set = load_eval_set("embedded")
    assert 20 <= len(eval_set) <= 30
    assert not eval_set.has_outputs and not eval_set.subset and not eval_set.alpaca_eval_order
    assert all(r["dataset"] == EMBEDDED_DATASET and r["output"] is None for r in eval_set.records)
    assert len(set(eval_set.instructions)) == len(eval_set)


def test_shared_eval_set_prefix_keeps_order(shared_dir):
    path = shared_dir / "alpaca_eval" / "eval_set.json"
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    full = load_eval_set(str(path))
    assert full.instructions == [r["instruction"] for r in raw]
    assert full.alpaca_eval_order and not full.subset and full.reference_generator == "gpt4_1106_preview"
    prefix = load_eval_set(str(path), max_instructions=12)
    assert prefix.instructions == [r["instruction"] for r in raw[:12]]
    assert prefix.subset and prefix.alpaca_eval_order


def test_missing_field_names_file_record_and_field(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "a", "output": "b", "generator": "g", "dataset": "d"},
                {"instruction": "c", "output": "d", "dataset": "d"},
            ]
        )
    )
    with pytest.raises(EvalSetError) as err:
        load_eval_set(str(path))
    message = str(err.value)
    assert str(path) in message and "record 1" in message and "'generator'" in message


def test_bad_specs(tmp_path):
    with pytest.raises(EvalSetError, match="neither 'alpaca_eval', 'embedded' nor an existing JSON file"):
        load_eval_set(str(tmp_path / "absent.json"))
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(EvalSetError, match="expected a JSON list"):
        load_eval_set(str(tmp_path / "obj.json"))


def test_hub_offline_suggests_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        eval_set = load_eval_set("alpaca_eval", max_instructions=3)
    except EvalSetError as exc:
        assert "local JSON file" in str(exc)
    else:  # the dataset happens to be in the local HF cache
        assert len(eval_set) == 3 and eval_set.alpaca_eval_order
