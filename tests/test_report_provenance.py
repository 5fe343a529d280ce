"""``python -m steps.report --filter KEY=VALUE --group-by KEY`` on runs built here (the Metaflow read is replaced
by these records; everything after it, the CLI's parsing and the files written, is the real path)."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone

import pytest

import steps.report.generate as generate
from steps.report.__main__ import main
from steps.report.records import RunRecord
from tests.eval_results import alpaca_eval_result, provenance, variant_result

SERVED = {"judge_endpoint": "served", "judge_model": "gpt-4o", "judge_settings": "openai_compatible:gpt-4o"}


def _records() -> list[RunRecord]:
    """Run 1: SFT and DPO judged locally with alpaca_eval 0.6.6 at temperature 0.9. Run 2: DPO and SimPO judged
    by a served gpt-4o with alpaca_eval 0.6.2, SimPO sampled at temperature 0.7."""
    old = {"alpaca_eval_version": "0.6.2", **SERVED}
    first = [
        variant_result("sft", alpaca_eval_result(provenance=provenance(), win_rate=10.0)),
        variant_result("dpo", alpaca_eval_result(provenance=provenance(), win_rate=20.0)),
    ]
    cooler = {**provenance().decoding, "temperature": 0.7}
    second = [
        variant_result("dpo", alpaca_eval_result(provenance=provenance(**old), win_rate=30.0)),
        variant_result("simpo", alpaca_eval_result(provenance=provenance(**old, decoding=cooler), win_rate=40.0)),
    ]
    return [
        RunRecord("PrefFlow", str(run), datetime(2026, 1, run, tzinfo=timezone.utc), [], [], True, results)
        for run, results in ((1, first), (2, second))
    ]


@pytest.fixture()
def report(monkeypatch, tmp_path):
    """Run the CLI on :func:`_records`; returns (exit code, results.json, results.md, results.csv rows)."""
    calls = []

    def select_runs(selection, include_runs=()):
        calls.append(selection)
        return _records()

    monkeypatch.setattr(generate, "select_runs", select_runs)

    def run(*args: str):
        code = main(["--out-dir", str(tmp_path), "-q", *args])
        if code != 0:
            return code, None, None, None
        doc = json.loads((tmp_path / "results.json").read_text())
        with open(tmp_path / "results.csv", encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        return code, doc, (tmp_path / "results.md").read_text(), rows

    run.calls = calls  # type: ignore[attr-defined]
    return run


def _wins(doc) -> list[tuple[str, str, float]]:
    return [(r["run_id"], r["variant"], r["winrate"]) for r in doc["rows"]]


def test_filter_by_provenance_fields_and_loss(report):
    code, doc, md, rows = report("--filter", "judge_endpoint=served")
    assert code == 0 and _wins(doc) == [("2", "dpo", 30.0), ("2", "simpo", 40.0)]
    assert doc["selection"]["row_filters"] == ["judge_endpoint=served"]
    assert "rows with `judge_endpoint=served`" in md and md.count("| `PrefFlow/") == 2
    assert [r["judge_model"] for r in rows] == ["gpt-4o", "gpt-4o"]

    # repeated filters all hold; 'loss' names the loss column, values compare case-insensitively and as numbers
    code, doc, _, _ = report("--filter", "loss=dpo", "--filter", "alpaca_eval_version=0.6.6")
    assert _wins(doc) == [("1", "dpo", 20.0)]
    code, doc, _, _ = report("--filter", "decoding.temperature=0.70")
    assert _wins(doc) == [("2", "simpo", 40.0)]
    code, doc, _, _ = report("--filter", "benchmark_versions.lm_eval=0.4.13", "--filter", "judge_model=tiny")
    assert _wins(doc) == [("1", "sft", 10.0), ("1", "dpo", 20.0)]
    code, doc, md, _ = report("--filter", "judge_endpoint=alpaca_eval")
    assert doc["rows"] == [] and "_No successful runs match this selection._" in md


def test_group_by_alpaca_eval_version_gives_one_table_per_value(report):
    code, doc, md, _ = report("--group-by", "alpaca_eval_version", "--filter", "loss=DPO")
    assert code == 0 and doc["selection"]["group_by"] == "alpaca_eval_version"
    assert _wins(doc) == [("1", "dpo", 20.0), ("2", "dpo", 30.0)]
    sections = md.split("### ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "`alpaca_eval_version` = 0.6.6 (1 model)",
        "`alpaca_eval_version` = 0.6.2 (1 model)",
    ]
    assert "| 20.00 ± 3.12 |" in sections[0] and "30.00" not in sections[0]
    assert "| 30.00 ± 3.12 |" in sections[1] and "20.00" not in sections[1]
    # the existing columns group too: every row here carries the judge label local_logprob:tiny
    code, doc, md, _ = report("--group-by", "judge")
    assert code == 0 and md.count("### `judge` = ") == 1 and "### `judge` = local_logprob:tiny (4 models)" in md
    code, doc, md, _ = report("--group-by", "judge_model")
    assert _wins(doc) == [("1", "sft", 10.0), ("1", "dpo", 20.0), ("2", "dpo", 30.0), ("2", "simpo", 40.0)]
    assert [s.splitlines()[0] for s in md.split("### ")[1:]] == [
        "`judge_model` = tiny (2 models)",
        "`judge_model` = gpt-4o (2 models)",
    ]


def test_bad_keys_fail_before_any_run_is_read(report, capsys):
    assert report("--filter", "judge_kind=local")[0] == 2
    assert "unknown key 'judge_kind'" in capsys.readouterr().err
    assert report("--filter", "no_equals_sign")[0] == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert report("--group-by", "decoding.")[0] == 2
    assert "--group-by 'decoding.': unknown key 'decoding.'" in capsys.readouterr().err
    assert report.calls == []  # type: ignore[attr-defined]
