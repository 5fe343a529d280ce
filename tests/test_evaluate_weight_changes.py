"""Evaluation precision honesty: the share of weight entries that differ from the init in the evaluation dtype,
read tensor by tensor from the two directories, checked against shares computed here with plain torch; the
report's footnote where the scored model is its init in that dtype."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from steps.evaluate import weight_changes
from steps.evaluate.weight_changes import WeightChange, unchanged_reason, weight_change
from steps.report.rows import rows_for_run
from steps.report.table import results_csv, run_results_table


def _bf16_exact_init(tmp_path, tokenizer):
    """A tiny fp32 model whose every weight is a bfloat16 value (like a bf16 Hub base saved in fp32)."""
    from steps.models import load_model

    model = load_model("tiny", seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    init = tmp_path / "init"
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    return model, init


def _save_updated(model, path, update, **save_kwargs):
    """The model with ``update(name, weight)`` added to each weight, saved in fp32 (as exports are)."""
    import copy

    updated = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in updated.named_parameters():
            p.add_(update(name, p))
    updated.save_pretrained(path, **save_kwargs)
    return path


def _expected(model_dir, init_dir, dtype):
    """The share computed here: whole state dicts, cast, compared; over the names both files hold."""
    a, b = load_file(str(model_dir / "model.safetensors")), load_file(str(init_dir / "model.safetensors"))
    names = [n for n in a if n in b]
    changed = sum(int((a[n].to(dtype) != b[n].to(dtype)).sum()) for n in names)
    total = sum(a[n].numel() for n in names)
    return changed, total


def tiny_update(name, p):
    """2^-12 of each weight: a real fp32 change, less than half a bfloat16 step (>= 2^-9 of the weight)."""
    return p * 2.0**-12


def test_update_below_bf16_resolution_is_zero_in_bf16_and_counted_in_fp32(tmp_path, tokenizer, caplog):
    model, init = _bf16_exact_init(tmp_path, tokenizer)
    scored = _save_updated(model, tmp_path / "dpo", tiny_update)

    exp_bf16, total = _expected(scored, init, torch.bfloat16)
    exp_fp32, _ = _expected(scored, init, torch.float32)
    assert exp_bf16 == 0 and exp_fp32 > 0.9 * total  # what the test model is built to be (zeros stay equal)

    with caplog.at_level(logging.WARNING, logger="steps.evaluate.weight_changes"):
        bf16 = weight_change(str(scored), str(init), "bfloat16", show_progress=False)
    assert (bf16.changed, bf16.total, bf16.share) == (0, total, 0.0)
    assert bf16.changed_stored == exp_fp32
    assert bf16.note == "the update is below bfloat16's resolution; evaluate in float32 (evaluation.dtype)"
    assert "IS its init in bfloat16" in caplog.text and "below bfloat16's resolution" in caplog.text

    fp32 = weight_change(str(scored), str(init), "float32", show_progress=False)
    assert (fp32.changed, fp32.total, fp32.note) == (exp_fp32, total, None)
    assert math.isclose(fp32.share, exp_fp32 / total)


def test_partly_visible_update_counts_exactly_and_streams_sharded_files(tmp_path, tokenizer, monkeypatch):
    """Every 7th entry moves by 5 % (visible in bf16), the rest by 2^-12 (not): the bf16 share is the visible ones.
    The scored model is sharded and read in slices of 1000 entries: the same counts as whole files."""
    model, init = _bf16_exact_init(tmp_path, tokenizer)

    def mixed(name, p):
        visible = (torch.arange(p.numel()).reshape(p.shape) % 7 == 0).to(p.dtype)
        return p * (visible * 0.05 + (1 - visible) * 2.0**-12)

    whole = _save_updated(model, tmp_path / "whole", mixed)
    exp_bf16, total = _expected(whole, init, torch.bfloat16)
    assert 0 < exp_bf16 < total

    sharded = _save_updated(model, tmp_path / "sharded", mixed, max_shard_size="300KB")
    assert (sharded / weight_changes.INDEX_FILE).is_file()
    monkeypatch.setattr(weight_changes, "CHUNK_ELEMENTS", 1000)
    result = weight_change(str(sharded), str(init), "bfloat16", show_progress=False)
    assert (result.changed, result.total, result.note) == (exp_bf16, total, None)


def test_untouched_model_and_models_without_weight_files(tmp_path, tokenizer):
    _, init = _bf16_exact_init(tmp_path, tokenizer)
    same = weight_change(str(init), str(init), "float32", show_progress=False)
    assert same.changed == same.changed_stored == 0 and same.note == unchanged_reason("float32", 0)
    assert "exactly as it was" in same.note

    in_memory = weight_change(str(init), "tiny", "bfloat16", show_progress=False)
    assert in_memory.changed is None and in_memory.share is None
    assert in_memory.note == "not measured: tiny is a tiny model built in memory: there are no weight files to compare"
    missing = weight_change(str(tmp_path / "nowhere"), str(init), "bfloat16", show_progress=False)
    assert missing.changed is None and "does not exist" in missing.note


def _result(variant, change: WeightChange | None, init="base"):
    return {
        "variant": variant,
        "evaluated": True,
        "win_rate": 50.0,
        "standard_error": 2.0,
        "length_controlled_winrate": 51.0,
        "lc_standard_error": 1.0,
        "model_dir": f"/runs/{variant}",
        "init": init,
        "judge": "j",
        "weight_change": change.record() if change else None,
        "generation": {"dtype": change.dtype if change else "float32"},
    }


def test_report_footnotes_a_row_that_scores_its_init(tmp_path, tokenizer):
    model, init = _bf16_exact_init(tmp_path, tokenizer)
    scored = _save_updated(model, tmp_path / "dpo", tiny_update)
    unchanged = weight_change(str(scored), str(init), "bfloat16", show_progress=False)
    changed = weight_change(str(scored), str(init), "float32", show_progress=False)
    results = [_result("sft", changed), _result("dpo", unchanged, init="/runs/sft"), _result("simpo", None)]

    table = run_results_table(results, "PrefFlow", "7")
    lines = table.splitlines()
    dpo_line = next(line for line in lines if "| DPO |" in line)
    sft_line = next(line for line in lines if "| SFT |" in line)
    assert "| 50.00 ± 2.00 [a] | DPO |" in dpo_line and "[a]" not in sft_line
    assert lines[-1] == (
        "[a] LC WR / WR: the scored model equals its initialization in bfloat16: the update is below bfloat16's "
        "resolution; evaluate in float32 (evaluation.dtype)"
    )

    from datetime import datetime, timezone

    from steps.report.records import RunRecord

    record = RunRecord("PrefFlow", "7", datetime(2025, 1, 1, tzinfo=timezone.utc), [], [], True, results)
    rows = {row.variant: row for row in rows_for_run(record)}
    assert (rows["dpo"].eval_dtype, rows["dpo"].weights_changed_share) == ("bfloat16", 0.0)
    assert rows["sft"].weights_changed_share == pytest.approx(changed.changed / changed.total)
    assert rows["sft"].weights_unchanged_reason is None and rows["simpo"].weights_changed_share is None
    csv_lines = results_csv(list(rows.values())).splitlines()
    assert ",eval_dtype,weights_changed_share,weights_unchanged_reason," in csv_lines[0]  # later fields follow
    assert ",bfloat16,0.0,the scored model equals its initialization in bfloat16" in csv_lines[2]


def test_evaluate_model_records_and_logs_a_model_that_is_its_init_in_the_eval_dtype(tmp_path, tokenizer, caplog):
    """The evaluate step's own path: generation in bfloat16 from the directories, the finding in metrics.json,
    the step log and the run's results table."""
    import json

    from steps.config import EvaluationConfig
    from steps.evaluate import EvalContext, ModelRun, evaluate_model, load_eval_set
    from tests.eval_results import variant_result

    model, init = _bf16_exact_init(tmp_path, tokenizer)
    scored = _save_updated(model, tmp_path / "dpo", tiny_update)
    tokenizer.save_pretrained(scored)
    eval_set = load_eval_set("embedded", max_instructions=4)
    refs = [{"instruction": q, "output": "Yes.", "generator": "ref"} for q in eval_set.instructions]
    settings = EvaluationConfig(max_new_tokens=3, batch_size=4, judge="local_logprob:tiny", judge_max_chars=200)
    run = ModelRun("hf", device="cpu", dtype="bfloat16", show_progress=False)
    context = EvalContext(generator="dpo", out_dir=tmp_path / "eval", run=run, init_model=str(init))
    with caplog.at_level(logging.INFO):
        result = evaluate_model(str(scored), eval_set, refs, settings, context)
    assert result.weight_change is not None
    change = result.weight_change.record()
    exp_fp32, total = _expected(scored, init, torch.float32)
    assert (change["dtype"], change["changed"], change["changed_stored"], change["total"]) == (
        "bfloat16",
        0,
        exp_fp32,
        total,
    )
    assert result.generation["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["weight_change"] == change
    assert "scores of a model equal to its init in bfloat16: the update is below bfloat16's resolution" in caplog.text

    table = run_results_table([variant_result("dpo", result)], "PrefFlow", "8")
    assert " [a] | DPO |" in table and table.rstrip().endswith("evaluate in float32 (evaluation.dtype)")
    skipped = evaluate_model(
        str(scored), eval_set, refs, dataclasses.replace(settings, weight_change_check=False), context
    )
    assert skipped.weight_change is None  # evaluation.weight_change_check: false
