"""Paired comparison of two models on the same instructions: the difference computed independently from two
official annotation files, a deterministic bootstrap interval of sensible width, and the CLI's last-line JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from steps.evaluate.paired import paired_comparison
from steps.evaluate.scoring import AnnotationsError


def _load(shared_dir, model):
    with open(shared_dir / "alpaca_eval" / "annotations" / f"{model}.json", encoding="utf-8") as fh:
        return json.load(fh)


def _plain_delta(a_rows, b_rows):
    """Mean over instructions present in both of (A's win - B's win) x 100, in plain Python."""
    b_by_instruction = {r["instruction"]: r["preference"] for r in b_rows}
    diffs = [
        (r["preference"] - 1) - (b_by_instruction[r["instruction"]] - 1)
        for r in a_rows
        if r["instruction"] in b_by_instruction
    ]
    return math.fsum(diffs) / len(diffs) * 100, diffs


PAIRS = [("vicuna-7b-v1.5", "alpaca-7b"), ("FuseChat-Llama-3.1-8B-Instruct", "vicuna-7b-v1.5")]


@pytest.mark.parametrize("model, baseline", PAIRS)
def test_paired_difference_of_official_files(shared_dir, model, baseline):
    a, b = _load(shared_dir, model), _load(shared_dir, baseline)
    assert len({r["instruction"] for r in a}) == len(a) == 805  # instructions are unique: pairing by text is exact
    expected, diffs = _plain_delta(a, b)
    result = paired_comparison(a, list(reversed(b)))  # pairing is by instruction, not position
    assert result["paired_delta_wr"] == expected
    assert result["paired_n"] == 805 and result["paired_n_unpaired"] == 0
    low, high = result["paired_ci95"]
    assert low < expected < high
    mean = math.fsum(diffs) / len(diffs)
    se = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) * 100
    assert result["paired_standard_error"] == pytest.approx(se, rel=1e-9)
    # a percentile bootstrap of a mean over 805 rows is close to the normal interval +- 1.96 s.e.
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert result["distinguishable"] is (low > 0 or high < 0)
    assert result["paired_bootstrap"] == {"method": "percentile", "resamples": 10_000, "seed": 0, "rng": "numpy PCG64"}


def test_bootstrap_is_deterministic_and_seeded(shared_dir):
    a, b = _load(shared_dir, "vicuna-7b-v1.5"), _load(shared_dir, "alpaca-7b")
    first = paired_comparison(a, b, resamples=2_000)
    assert paired_comparison(a, b, resamples=2_000) == first
    other = paired_comparison(a, b, resamples=2_000, seed=7)
    assert other["paired_ci95"] != first["paired_ci95"]
    assert other["paired_ci95"] == pytest.approx(first["paired_ci95"], abs=0.3)
    assert other["paired_delta_wr"] == first["paired_delta_wr"]


def test_model_against_itself_is_not_distinguishable(shared_dir):
    a = _load(shared_dir, "alpaca-7b")
    result = paired_comparison(a, a, resamples=500)
    assert result["paired_delta_wr"] == 0.0 and result["paired_ci95"] == [0.0, 0.0]
    assert result["distinguishable"] is False


def test_missing_judgements_and_unshared_rows_are_left_out():
    def row(i, p, ref="r"):
        return {
            "instruction": f"q{i}",
            "output_1": ref,
            "generator_1": "ref",
            "output_2": "x",
            "generator_2": "m",
            "preference": p,
        }

    a = [row(0, 2.0), row(1, 1.0), row(2, None), row(3, 0.0), row(4, 1.5)]
    b = [row(0, 1.0), row(1, 1.0), row(2, 1.5), row(3, 1.0)]
    result = paired_comparison(a, b, resamples=200)
    # shared: q0..q3; q2 lacks A's judgement; q3's 0.0 is alpaca_eval's draw (0.5)
    assert result["paired_n"] == 3 and result["paired_n_missing_judgement"] == 1 and result["paired_n_unpaired"] == 1
    assert result["paired_delta_wr"] == pytest.approx(100 * (1.0 + 0.0 + 0.5) / 3)
    with pytest.raises(AnnotationsError, match="different reference answers"):
        paired_comparison(a, [row(0, 1.0, ref="other")])
    with pytest.raises(AnnotationsError, match="share no instruction"):
        paired_comparison(a, [row(9, 1.0)])


def test_score_cli_adds_paired_fields(shared_dir):
    folder = shared_dir / "alpaca_eval" / "annotations"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.evaluate",
            "score",
            "--annotations",
            str(folder / "vicuna-7b-v1.5.json"),
            "--baseline-annotations",
            str(folder / "alpaca-7b.json"),
            "--no-hub",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    expected, _ = _plain_delta(_load(shared_dir, "vicuna-7b-v1.5"), _load(shared_dir, "alpaca-7b"))
    assert result["paired_delta_wr"] == expected and result["paired_n"] == 805
    low, high = result["paired_ci95"]
    assert low < expected < high and result["paired_distinguishable"] is (low > 0 or high < 0)
    assert result["win_rate"] - 4.797493939167703 == pytest.approx(0, abs=1e-4)


def _annotation_file(path, preferences):
    from steps.io import write_json

    rows = [
        {"instruction": f"q{i}", "output_1": f"ref{i}", "output_2": f"ans{i}", "preference": p}
        for i, p in enumerate(preferences)
    ]
    write_json(path, rows)
    return str(path)


def test_the_join_shows_na_when_no_instruction_has_a_judgement_in_both(tmp_path):
    """A judge that returned no usable preference (all missing) must not fail the join: the row's paired cell is
    n/a with the reason, and a row with judgements still gets its difference (2,2,1 vs 1,1,1: +66.67)."""
    from steps.config import EvaluationConfig
    from steps.pipeline import _add_paired
    from steps.report.table import run_results_table
    from tests.eval_results import alpaca_eval_result, variant_result

    def row(variant, preferences):
        path = _annotation_file(tmp_path / f"{variant}.json", preferences)
        return variant_result(variant, alpaca_eval_result(annotations=path))

    rows = [row("sft", [1.0, 1.0, 1.0]), row("dpo", [None, None, None]), row("simpo", [2.0, 2.0, 1.0])]
    sft, dpo, simpo = _add_paired(rows, EvaluationConfig(paired_resamples=200))
    assert sft.paired_vs is not None and sft.paired_vs.is_baseline and sft.paired_vs.baseline == "sft"
    assert dpo.paired_vs is not None and dpo.paired_vs.comparison is None
    assert "no shared instruction has a judgement in both" in (dpo.paired_vs.unavailable or "")
    assert simpo.paired_vs is not None and simpo.paired_vs.comparison is not None
    assert simpo.paired_vs.comparison["paired_delta_wr"] == pytest.approx(200 / 3)
    table = run_results_table([sft, dpo, simpo], "F", "1")
    cells = {line.split(" | ")[2]: line.split(" | ")[6] for line in table.splitlines()[2:5]}
    assert cells["SFT"] == "— (baseline)" and cells["DPO"] == "n/a [p1]" and cells["SimPO"].startswith("+66.67 [")
    assert f"[p1] Δ WR n/a: {dpo.paired_vs.unavailable}" in table.splitlines()
