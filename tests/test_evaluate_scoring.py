"""Scoring with alpaca_eval's metrics against the official AlpacaEval 2 leaderboard numbers."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from steps.evaluate.scoring import AnnotationsError, LcAssetsError, score

# Official weighted_alpaca_eval_gpt4_turbo leaderboard (alpaca_eval 0.6.6's
# leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv): (WR, LC).
OFFICIAL = {
    "alpaca-7b": (2.591450540223603, 5.875487163278986),
    "vicuna-7b-v1.5": (4.797493939167703, 7.616892731870527),
    "FuseChat-Llama-3.1-8B-Instruct": (63.33158292362734, 65.38623116037492),
}


def _annotations(shared_dir, model):
    with open(shared_dir / "alpaca_eval" / "annotations" / f"{model}.json", encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.parametrize("model", sorted(OFFICIAL))
def test_official_files_reproduce_leaderboard(shared_dir, model):
    annotations = _annotations(shared_dir, model)
    assets = shared_dir / "alpaca_eval" / "lc_assets_reconstructed"
    result = score(annotations, lc_assets_dir=assets)
    wr, lc = OFFICIAL[model]
    assert abs(result.win_rate - wr) < 1e-4
    assert abs(result.length_controlled_winrate - lc) < 1.0
    assert result.n_total == 805
    assert result.lc_method == f"length_controlled_v1 (approximate assets: {assets})"
    assert result.lc_approximate_assets is True
    # independent WR: mean(preference - 1) * 100 over all rows
    prefs = [float(r["preference"]) for r in annotations]
    assert abs(result.win_rate - 100 * sum(p - 1 for p in prefs) / len(prefs)) < 1e-9
    assert result.n_wins == sum(p > 1.5 for p in prefs)
    assert result.avg_length == int(sum(len(r["output_2"]) for r in annotations) / len(annotations))
    json.dumps(dataclasses.asdict(result))  # plain JSON types only


def test_redirect_is_restored_after_scoring(shared_dir):
    from alpaca_eval.metrics import glm_winrate

    original = glm_winrate.hf_hub_download
    score(
        _annotations(shared_dir, "alpaca-7b")[:50], shared_dir / "alpaca_eval" / "lc_assets_reconstructed", subset=True
    )
    assert glm_winrate.hf_hub_download is original


def test_subset_is_labelled(shared_dir):
    assets = shared_dir / "alpaca_eval" / "lc_assets_reconstructed"
    result = score(_annotations(shared_dir, "vicuna-7b-v1.5")[:100], lc_assets_dir=assets, subset=True)
    assert result.lc_method == f"length_controlled_v1_subset (approximate assets: {assets})"
    assert result.n_total == 100
    assert math.isfinite(result.length_controlled_winrate)


def test_no_assets_gives_labelled_number(shared_dir):
    result = score(_annotations(shared_dir, "vicuna-7b-v1.5"), lc_assets_dir=None, use_hub=False)
    assert result.lc_method == "length_controlled_v1_no_gamed_regularisation_no_instruction_difficulty"
    assert 0 < result.length_controlled_winrate < 100
    assert result.lc_assets is None
    assert abs(result.win_rate - OFFICIAL["vicuna-7b-v1.5"][0]) < 1e-4


def test_other_instruction_sets_ignore_assets(shared_dir):
    rows = _annotations(shared_dir, "alpaca-7b")[:40]
    result = score(
        rows, lc_assets_dir=shared_dir / "alpaca_eval" / "lc_assets_reconstructed", alpaca_eval_order=False, subset=True
    )
    assert result.lc_method == "length_controlled_v1_subset_no_gamed_regularisation_no_instruction_difficulty"


def test_unmarked_assets_dir_not_called_approximate(shared_dir, tmp_path):
    source = shared_dir / "alpaca_eval" / "lc_assets_reconstructed"
    assets = tmp_path / "lc_assets"
    assets.mkdir()
    for name in ("df_gamed.csv", "instruction_difficulty.csv"):
        (assets / name).write_bytes((source / name).read_bytes())
    rows = _annotations(shared_dir, "alpaca-7b")
    assert score(rows, lc_assets_dir=assets).lc_method == f"length_controlled_v1 (assets: {assets})"
    (assets / "APPROXIMATE").write_text("estimated from public leaderboard data\n")
    assert score(rows, lc_assets_dir=assets).lc_method == f"length_controlled_v1 (approximate assets: {assets})"


def test_assets_dir_without_files_is_an_error(shared_dir, tmp_path):
    with pytest.raises(LcAssetsError, match=r"df_gamed\.csv"):
        score(_annotations(shared_dir, "alpaca-7b"), lc_assets_dir=tmp_path)


def test_too_few_rows_for_lc():
    rows = [
        {
            "instruction": f"q{i}",
            "output_1": "a",
            "output_2": "bb",
            "generator_1": "ref",
            "generator_2": "m",
            "preference": p,
        }
        for i, p in enumerate([1.0, 2.0, 1.75])
    ]
    result = score(rows, alpaca_eval_order=False)
    assert result.length_controlled_winrate is None and result.lc_standard_error is None
    assert result.lc_unavailable_reason.startswith("3 judged instructions; the length-controlled GLM needs at least 50")
    assert result.lc_method == "length_controlled_v1_no_gamed_regularisation_no_instruction_difficulty"
    assert result.win_rate == pytest.approx(100 * (0 + 1 + 0.75) / 3)
    assert result.n_draws == 0


def test_bad_annotations_name_the_record():
    rows = [
        {
            "instruction": "q",
            "output_1": "a",
            "output_2": "b",
            "generator_1": "r",
            "generator_2": "m",
            "preference": 1.2,
        },
        {"instruction": "q2", "output_1": "a", "generator_1": "r", "generator_2": "m", "preference": 1.2},
    ]
    with pytest.raises(AnnotationsError, match=r"record 1 lacks \['output_2'\]"):
        score(rows)
    rows[1]["output_2"] = "b"
    rows[1]["preference"] = 3.0
    with pytest.raises(AnnotationsError, match=r"record 1 preference 3\.0"):
        score(rows)


def test_score_cli_prints_one_json(shared_dir):
    path = shared_dir / "alpaca_eval" / "annotations" / "alpaca-7b.json"
    assets = shared_dir / "alpaca_eval" / "lc_assets_reconstructed"
    proc = subprocess.run(
        [sys.executable, "-m", "steps.evaluate", "score", "--annotations", str(path), "--lc-assets", str(assets)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert abs(result["win_rate"] - OFFICIAL["alpaca-7b"][0]) < 1e-4
    assert result["alpaca_eval_order"] is True
    assert "approximate assets" in result["lc_method"]
