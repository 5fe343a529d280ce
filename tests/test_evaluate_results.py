"""Typed evaluation results (steps/evaluate/results.py): the report reads a run's typed join rows and an older run's
plain dicts (the legacy adapter) into the same rows, byte for byte; metrics.json keeps alpaca_eval's flat form."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

from steps.evaluate.results import HubUpload, PairedVs
from steps.evaluate.weight_changes import WeightChange
from steps.report import RunRecord, Selection, render_report
from steps.report.rows import legacy_result_row, rows_for_run
from tests.eval_results import alpaca_eval_result, heldout, legacy_dict, variant_result

RUN_CONFIG = {"name": "typed", "model": {"base": "tiny"}, "resources": {"output_dir": "runs"}}
ROOT = "/work/runs/PrefFlow/1800000000000007"


def _typed_rows():
    """A run's join rows covering every cell: baseline, a paired difference with held-out reward metrics, a
    measured judge agreement and a priced judge, a model equal to its init in bf16, an unavailable comparison and a
    model that was not evaluated."""
    agreement = {"n_agree": 16, "n_compared": 30, "agreement": 16 / 30, "official_annotator": "gpt4_turbo"}
    priced = alpaca_eval_result(
        judge="openai_compatible:gpt-4o-mini",
        length_controlled_winrate=52.5,
        lc_standard_error=1.1,
        lc_unavailable_reason=None,
    )
    priced = dataclasses.replace(priced, judge=dataclasses.replace(priced.judge, agreement=agreement, cost_usd=0.0123))
    unchanged = WeightChange("/r/simpo", "/r/sft", "bfloat16", changed=0, changed_stored=12, total=100, note="rounds")
    comparison = {"paired_delta_wr": 2.206, "paired_ci95": [0.97, 3.47], "distinguishable": True, "paired_n": 24}
    return [
        variant_result(
            "dpo",
            priced,
            model_dir=f"{ROOT}/dpo/final",
            init="SFT checkpoint",
            heldout=heldout(),
            paired_vs=PairedVs("sft", comparison=comparison),
            training_config={"lr": 5e-7, "criterion_config": {"_type_": "DPOConfig", "beta": 0.1, "nll_scale": 0.0}},
        ),
        variant_result(
            "sft",
            alpaca_eval_result(),
            model_dir=f"{ROOT}/sft/final",
            heldout=heldout(reward_accuracy=None),
            paired_vs=PairedVs("sft", is_baseline=True),
        ),
        variant_result(
            "simpo",
            dataclasses.replace(alpaca_eval_result(annotations="x"), weight_change=unchanged),
            model_dir=f"{ROOT}/simpo/final",
            init=f"{ROOT}/sft/final",
            paired_vs=PairedVs("sft", unavailable="no shared instruction has a judgement in both"),
        ),
        variant_result("orpo", None, model_dir=f"{ROOT}/orpo/final"),
    ]


def _record(results):
    return RunRecord(
        flow="PrefFlow",
        run_id="1800000000000007",
        created_at=datetime(2026, 1, 2, 12, tzinfo=timezone.utc),
        tags=["typed"],
        system_tags=[],
        successful=True,
        results=results,
        run_config=RUN_CONFIG,
        output_root=ROOT,
    )


def test_typed_and_legacy_results_give_the_same_report_byte_for_byte():
    typed = _typed_rows()
    legacy = [legacy_dict(r) for r in typed]
    assert all(isinstance(r, dict) and "win_rate" in r for r in legacy[:3]) and "win_rate" not in legacy[3]
    typed_files, _ = render_report([_record(typed)], Selection())
    legacy_files, _ = render_report([_record(legacy)], Selection())
    assert typed_files.keys() == legacy_files.keys()
    for name in typed_files:
        assert typed_files[name] == legacy_files[name], name
    rows = {row.variant: row for row in rows_for_run(_record(typed))}
    assert rows == {row.variant: row for row in rows_for_run(_record(legacy))}
    # the cells read from the typed rows, checked against the values put in
    assert rows["dpo"].judge_agreement_text == "16/30 (53%) vs gpt4_turbo" and rows["dpo"].judge_cost_usd == 0.0123
    assert (rows["dpo"].paired_delta_wr, rows["dpo"].paired_ci95) == (2.206, [0.97, 3.47])
    assert (rows["dpo"].heldout_accuracy, rows["dpo"].heldout_reward_accuracy) == (0.625, 0.875)
    assert rows["sft"].paired_is_baseline and rows["sft"].heldout_reward_accuracy is None
    assert rows["simpo"].model_initialization == "SFT (from base: tiny)" and rows["simpo"].paired_delta_wr is None
    assert rows["simpo"].weights_unchanged_reason == "the scored model equals its initialization in bfloat16: rounds"
    assert not rows["orpo"].evaluated and rows["orpo"].winrate is None and rows["orpo"].eval_dtype is None
    assert rows["dpo"].model_dir == "dpo/final" and rows["dpo"].training_config == "lr=5e-07, beta=0.1, nll_scale=0"
    assert typed_files["configs/PrefFlow-1800000000000007-dpo.yaml"].decode().count("beta: 0.1") == 1


def test_the_legacy_adapter_reads_a_sparse_old_row_without_errors():
    """An early run's row: a few keys, some malformed; what is missing or malformed becomes None."""
    row = legacy_result_row(
        _record([]),
        {"variant": "dpo", "win_rate": "high", "epoch": 1.5, "judge_tokens": [], "paired_vs": {"baseline": "sft"}},
    )
    assert row.evaluated and row.winrate is None and row.epoch is None and row.judge_tokens is None
    assert row.paired_baseline == "sft" and row.paired_delta_wr is None and row.train_steps is None


def test_eval_result_metrics_are_metrics_json_and_hub_uploads_are_typed():
    typed = _typed_rows()[0].evaluation
    metrics = typed.metrics()
    assert metrics["length_controlled_winrate"] == 52.5 and metrics["judge"] == "openai_compatible:gpt-4o-mini"
    assert metrics["heldout_preference"] == heldout().as_dict() and "per_pair" not in metrics["heldout_preference"]
    assert metrics["files"] == {
        "model_outputs": "model_outputs.json",
        "annotations": "annotations.json",
        "metrics": "metrics.json",
    }
    assert dataclasses.replace(typed, alpaca_eval=None).metrics() == {}
    upload = {
        "repo_id": "me/m",
        "private": True,
        "dry_run": True,
        "url": "https://huggingface.co/me/m",
        "token_env": "HF_TOKEN",
        "total_bytes": 10,
        "files": ["a", "b"],
    }
    assert HubUpload.of(upload) == HubUpload("me/m", True, True, "https://huggingface.co/me/m", "HF_TOKEN", 10, 2)
    assert HubUpload.of({**upload, "commit": "abc"}).commit == "abc"
