"""Honest LC: degenerate annotations give ``None`` plus a reason (never a crash, never a meaningless 50.00), with
real alpaca_eval fits on crafted annotations; and the one alpaca_eval internal the LC adapter relies on."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest

from steps.evaluate.lc_glm import GlmInterfaceError, check_glm_interface, fit_length_controlled, no_assets_resolver
from steps.evaluate.scoring import MIN_INSTRUCTIONS_FOR_LC, NO_DIFFICULTY_FORMULA, annotations_frame, score

MINIMAL_GLM = {"formula": NO_DIFFICULTY_FORMULA, "regularize_to_baseline_lambda": None, "kwargs": {"n_splits": 5}}


def _rows(preferences, output_1=None, output_2=None, generator_2="model"):
    """Crafted annotations: reference answers of varied length unless given."""
    n = len(preferences)
    output_1 = output_1 or [("reference answer " * (1 + i % 7)).strip() for i in range(n)]
    output_2 = output_2 or [("model answer " * (1 + (3 * i) % 5)).strip() for i in range(n)]
    return [
        {
            "instruction": f"instruction {i}",
            "output_1": output_1[i],
            "output_2": output_2[i],
            "generator_1": "reference",
            "generator_2": generator_2,
            "preference": p,
        }
        for i, p in enumerate(preferences)
    ]


def _independent_wr(preferences):
    valid = [1.5 if p == 0 else p for p in preferences if p is not None and not math.isnan(p)]
    return 100 * sum(p - 1 for p in valid) / len(valid) if valid else None


def _raw_alpaca_eval_lc(rows):
    """What alpaca_eval's GLM itself gives on the rows (no PrefFlow checks), or the exception it raises."""
    return fit_length_controlled(
        annotations_frame(rows), "length_controlled_v1", MINIMAL_GLM, no_assets_resolver(len(rows))
    )[0]


DEGENERATE = {
    "one instruction": (_rows([1.8]), "1 judged instruction; the length-controlled GLM needs at least 50"),
    "24 instructions (the default run)": (_rows([1.2, 1.9, 1.4, 1.7] * 6), "24 judged instructions"),
    "no judgement at all": (_rows([None] * 60), "0 judged instructions"),
    "all ties": (_rows([1.5] * 60), "every judgement is a tie"),
    "identical answers": (
        _rows([1.5] * 60, output_1=["same"] * 60, output_2=["same"] * 60),
        "every judgement is a tie",
    ),
    "same-length answers": (
        _rows([1.1, 1.9, 1.3] * 20, output_1=["abc"] * 60, output_2=["xyz"] * 60),
        "the length difference between model and reference is the same on every instruction",
    ),
    "constant length gap": (
        _rows([1.1, 1.9, 1.3] * 20, output_1=["abcdef"] * 60, output_2=["xyz"] * 60),
        "the length difference between model and reference is the same on every instruction",
    ),
    "model is its own reference": (_rows([1.2, 1.8, 1.6] * 20, generator_2="reference"), "same generator"),
    "uninformative judgements": (_rows([1.45, 1.55] * 40), "shrank every coefficient to zero"),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_annotations_give_na_with_reason(case):
    rows, reason = DEGENERATE[case]
    result = score(rows, alpaca_eval_order=False, use_hub=False)
    assert result.length_controlled_winrate is None and result.lc_standard_error is None
    assert reason in result.lc_unavailable_reason, result.lc_unavailable_reason
    expected_wr = _independent_wr([r["preference"] for r in rows])
    assert (result.win_rate is None) if expected_wr is None else result.win_rate == pytest.approx(expected_wr)
    json.dumps(dataclasses.asdict(result))


def test_same_length_answers_crash_raw_alpaca_eval():
    """The case behind the reported crash: alpaca_eval divides the length gap by its standard deviation (0)."""
    rows, _ = DEGENERATE["same-length answers"]
    with pytest.raises(ValueError, match="NaN"):
        _raw_alpaca_eval_lc(rows)


def test_uninformative_judgements_collapse_raw_alpaca_eval_to_fifty():
    rows, _ = DEGENERATE["uninformative judgements"]
    assert _raw_alpaca_eval_lc(rows) == 50.0


def test_collapse_on_official_slice(shared_dir):
    """50 real GPT-4-Turbo judgements of FuseChat (rows 603-652) on which the regularised GLM keeps nothing."""
    with open(shared_dir / "alpaca_eval" / "annotations" / "FuseChat-Llama-3.1-8B-Instruct.json") as fh:
        rows = json.load(fh)[603:653]
    assert _raw_alpaca_eval_lc(rows) == 50.0
    result = score(rows, alpaca_eval_order=False, use_hub=False)
    assert result.length_controlled_winrate is None
    assert "shrank every coefficient to zero" in result.lc_unavailable_reason
    assert result.win_rate == pytest.approx(_independent_wr([r["preference"] for r in rows]))


def test_meaningful_fit_is_kept(shared_dir):
    """A slice where the fit keeps its coefficients: a number, no reason; 50 rows is exactly the minimum."""
    with open(shared_dir / "alpaca_eval" / "annotations" / "FuseChat-Llama-3.1-8B-Instruct.json") as fh:
        rows = json.load(fh)[:MIN_INSTRUCTIONS_FOR_LC]
    result = score(rows, alpaca_eval_order=False, use_hub=False)
    assert result.lc_unavailable_reason is None
    assert result.length_controlled_winrate == pytest.approx(_raw_alpaca_eval_lc(rows))
    assert result.length_controlled_winrate != 50.0
    assert score(rows[:-1], alpaca_eval_order=False, use_hub=False).length_controlled_winrate is None


def test_empty_answers_do_not_crash():
    """Empty model answers (a model that stops at once): the length gap varies with the reference, so LC fits."""
    preferences = [1.0 + 0.02 * (i % 3) for i in range(60)]
    rows = _rows(preferences, output_2=[""] * 60)
    result = score(rows, alpaca_eval_order=False, use_hub=False)
    assert result.win_rate == pytest.approx(_independent_wr(preferences))
    assert (result.length_controlled_winrate is None) != (result.lc_unavailable_reason is None)
    assert result.avg_length == 0


def test_glm_failure_becomes_a_reason(tmp_path):
    """LC assets that do not cover the rows: alpaca_eval's difficulty lookup fails inside the fit."""
    assets = tmp_path / "assets"
    assets.mkdir()
    gamed = "".join(
        f"{m},{i},0.1,{1.2 + 0.1 * (i % 3)},{'a' * (5 + i)},{'b' * (3 + i % 4)}\n"
        for m in ("gamed_a", "gamed_b")
        for i in range(10)
    )
    (assets / "df_gamed.csv").write_text("model,index,instruction_difficulty,preference,output_1,output_2\n" + gamed)
    rows = _rows([1.1, 1.9, 1.3, 1.6] * 15)
    result = score(rows, lc_assets_dir=assets, alpaca_eval_order=True)
    assert result.length_controlled_winrate is None
    assert result.lc_unavailable_reason.startswith(
        "alpaca_eval's GLM fit failed (ValueError: Transform function failed"
    )
    assert result.win_rate == pytest.approx(_independent_wr([r["preference"] for r in rows]))


def test_no_difficulty_lc_has_no_fake_standard_error(shared_dir):
    with open(shared_dir / "alpaca_eval" / "annotations" / "vicuna-7b-v1.5.json") as fh:
        rows = json.load(fh)
    result = score(rows, use_hub=False)
    assert result.length_controlled_winrate is not None and result.lc_standard_error is None
    with_assets = score(rows, lc_assets_dir=shared_dir / "alpaca_eval" / "lc_assets_reconstructed")
    assert (with_assets.lc_standard_error or 0) > 0


# ---- the adapter's one reach into alpaca_eval -------------------------------------------------------------------


def test_alpaca_eval_still_fetches_assets_the_way_the_adapter_redirects():
    """Fails loudly when alpaca_eval changes what steps/evaluate/lc_glm.py replaces."""
    from alpaca_eval.metrics import glm_winrate

    parameters = inspect.signature(glm_winrate.hf_hub_download).parameters
    assert {"repo_id", "filename", "repo_type", "token", "cache_dir"} <= set(parameters)
    assert "hf_hub_download" in glm_winrate._get_featurized_data.__code__.co_names  # a module-global lookup
    assert "hf_hub_download" in glm_winrate._get_instructions_difficulty.__code__.co_names
    assert "_get_featurized_data" in glm_winrate.get_length_controlled_winrate.__code__.co_names
    assert "is_add_glm_preference_inplace" in inspect.signature(glm_winrate.get_length_controlled_winrate).parameters
    check_glm_interface()


def test_interface_check_names_what_changed(monkeypatch):
    from alpaca_eval.metrics import glm_winrate

    monkeypatch.delattr(glm_winrate, "hf_hub_download")
    with pytest.raises(GlmInterfaceError, match=r"has no callable hf_hub_download.*lc_glm\.py"):
        check_glm_interface()


def test_redirect_serves_the_requested_files(shared_dir):
    from alpaca_eval.metrics import glm_winrate

    from steps.evaluate.lc_glm import glm_downloads_served_by, local_resolver

    assets = shared_dir / "alpaca_eval" / "lc_assets_reconstructed"
    asked = []
    resolve = local_resolver(assets)
    original = glm_winrate.hf_hub_download
    with open(shared_dir / "alpaca_eval" / "annotations" / "alpaca-7b.json") as fh:
        frame = annotations_frame(json.load(fh))
    with glm_downloads_served_by(lambda name: asked.append(name) or resolve(name)):
        assert glm_winrate.hf_hub_download is not original
        lc_info = dict(glm_winrate.GLM_INFO["length_controlled_v1"])
        from alpaca_eval.metrics import get_length_controlled_winrate

        lc = get_length_controlled_winrate(frame.copy(), save_weights_dir=None, glm_info=lc_info)
    assert glm_winrate.hf_hub_download is original
    assert asked == ["df_gamed.csv"]
    assert abs(lc["length_controlled_winrate"] - 5.875487163278986) < 1.0  # official 5.88 (approximate assets)
