"""IFBench accuracy statistics on small hand-made results: accuracies and standard errors computed by hand, the
paired bootstrap against a direct numpy computation, and the result records' round trip. No wheel needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steps.evaluate.paired import bootstrap_mean_ci95
from steps.evaluate.verifiable.accuracy import (
    accuracy_summary,
    instruction_level,
    paired_accuracy_delta,
    prompt_level,
    unscored_counts,
)
from steps.evaluate.verifiable.ifbench_prompts import IFBenchInputError
from steps.evaluate.verifiable.ifbench_scoring import PromptResult, Verdict, prompt_result_from_record

MISSING = "missing NLTK data stopwords"


def _result(key, flags, ids=None, loose=None):
    """flags: True/False/None (None = unscored, reason MISSING); loose defaults to the strict flags."""
    ids = ids or tuple(f"t:{i}" for i in range(len(flags)))

    def verdicts(fs):
        return tuple(Verdict(f, MISSING if f is None else None) for f in fs)

    return PromptResult(key, tuple(ids), verdicts(flags), verdicts(loose if loose is not None else flags))


# five prompts, nine instructions: worked by hand below
HAND = [
    _result("1", [True, True]),  # all followed
    _result("2", [True, False, True]),  # one missed
    _result("3", [False]),
    _result("4", [True, None], ids=("a:x", "ratio:stop_words")),  # one instruction unscored
    _result("5", [True]),
]


def test_prompt_level_by_hand():
    stats = prompt_level(HAND, "strict")
    # prompts 1, 2, 3, 5 scored (4 has an unscored instruction); followed all: 1 and 5 -> 2 / 4
    assert stats["n_scored"] == 4 and stats["n_unscored"] == 1
    assert stats["accuracy"] == pytest.approx(50.0)
    assert stats["standard_error"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4) * 100)  # 25.0


def test_instruction_level_clustered_by_hand():
    stats = instruction_level(HAND, "strict")
    # scored instructions per prompt (followed, scored): (2,2) (2,3) (0,1) (1,1) (1,1) -> 6 / 8
    assert stats["n_scored"] == 8 and stats["n_unscored"] == 1
    assert stats["accuracy"] == pytest.approx(75.0)
    # residuals y - 0.75 m: 0.5, -0.25, -0.75, 0.25, 0.25 -> squares 0.25+0.0625+0.5625+0.0625+0.0625 = 1.0
    assert stats["standard_error"] == pytest.approx(math.sqrt(1.0) / 8 * 100)  # 12.5


def test_clustered_se_equals_binomial_with_one_instruction_per_prompt():
    results = [_result(str(i), [f]) for i, f in enumerate([True, True, False, True, False, True, True])]
    inst, prompt = instruction_level(results, "strict"), prompt_level(results, "strict")
    p = 5 / 7
    assert inst["accuracy"] == pytest.approx(p * 100) and prompt["accuracy"] == pytest.approx(p * 100)
    assert inst["standard_error"] == pytest.approx(math.sqrt(p * (1 - p) / 7) * 100)
    assert prompt["standard_error"] == pytest.approx(inst["standard_error"])


def test_unscored_counts_and_modes_are_separate():
    results = [*HAND, _result("6", [False, None], ids=("b:y", "format:title_case"), loose=[True, True])]
    strict, loose = unscored_counts(results, "strict"), unscored_counts(results, "loose")
    assert strict == {"by_type": {"format:title_case": 1, "ratio:stop_words": 1}, "by_reason": {MISSING: 2}}
    assert loose == {"by_type": {"ratio:stop_words": 1}, "by_reason": {MISSING: 1}}
    summary = accuracy_summary(results)
    assert summary["loose"]["prompt_level"]["n_scored"] == 5  # prompt 6 is scored (and followed) under loose
    assert summary["loose"]["prompt_level"]["accuracy"] == pytest.approx(60.0)  # 1, 5, 6 of 1, 2, 3, 5, 6


def test_nothing_scored_gives_none_not_zero():
    results = [_result("1", [None]), _result("2", [True, None])]
    assert prompt_level(results, "strict")["accuracy"] is None
    assert instruction_level(results, "strict")["accuracy"] == pytest.approx(100.0)  # one scored instruction
    assert instruction_level([_result("1", [None])], "strict")["accuracy"] is None


def _direct_percentile_ci(differences, seed, resamples):
    """All resamples drawn in one numpy call (the library draws them in chunks of 1,000 rows)."""
    d = np.asarray(differences, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    low, high = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def test_bootstrap_matches_a_direct_numpy_computation():
    differences = [1.0, 0.0, 0.0, -1.0, 1.0, 1.0, 0.0, 1.0, 0.0, -1.0, 1.0, 0.0]
    assert bootstrap_mean_ci95(differences, seed=3, resamples=10_000) == _direct_percentile_ci(differences, 3, 10_000)


def test_paired_delta_by_hand_and_bootstrap():
    a = [_result(str(i), [f]) for i, f in enumerate([True, True, False, True, False, True, True, True])]
    b = [_result(str(i), [f]) for i, f in enumerate([True, False, False, False, True, True, False, True])]
    b.append(_result("99", [True]))  # only in the baseline: unpaired
    result = paired_accuracy_delta(a, list(reversed(b)))  # paired by key, not by position
    diffs = [0, 1, 0, 1, -1, 0, 1, 0]
    assert result["delta"] == pytest.approx(sum(diffs) / 8 * 100)  # 25.0
    assert result["n"] == 8 and result["n_unpaired"] == 1 and result["n_unscored_in_either"] == 0
    low, high = _direct_percentile_ci([float(d) for d in diffs], 0, 10_000)
    assert result["ci95"] == pytest.approx([low * 100, high * 100], abs=1e-9)
    mean = sum(diffs) / 8
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 7 / 8) * 100
    assert result["standard_error"] == pytest.approx(se)
    assert result["distinguishable"] is (low > 0 or high < 0)
    assert result["bootstrap"] == {"method": "percentile", "resamples": 10_000, "seed": 0, "rng": "numpy PCG64"}


def test_model_against_itself_is_exactly_zero():
    result = paired_accuracy_delta(HAND, HAND)
    assert result["delta"] == 0.0 and result["ci95"] == [0.0, 0.0] and result["distinguishable"] is False
    assert result["n"] == 4 and result["n_unscored_in_either"] == 1


def test_paired_delta_skips_prompts_unscored_in_either_and_rejects_other_instructions():
    a = [_result("1", [True]), _result("2", [None]), _result("3", [False])]
    b = [_result("1", [False]), _result("2", [True]), _result("3", [None])]
    result = paired_accuracy_delta(a, b)
    assert result["n"] == 1 and result["delta"] == pytest.approx(100.0) and result["n_unscored_in_either"] == 2
    with pytest.raises(IFBenchInputError, match="share no prompt scored in both"):
        paired_accuracy_delta([_result("2", [None])], [_result("2", [True])])
    with pytest.raises(IFBenchInputError, match="different instructions"):
        paired_accuracy_delta([_result("1", [True], ids=("x:a",))], [_result("1", [True], ids=("x:b",))])


def test_result_records_round_trip_and_bad_records_name_the_problem():
    for result in HAND:
        record = result.to_record()
        assert prompt_result_from_record(record) == result
    record = HAND[3].to_record()
    assert record["strict"] == {
        "follow_all_instructions": None,
        "follow_instruction_list": [True, None],
        "unscored_reasons": [None, MISSING],
    }
    record["loose"]["follow_instruction_list"] = ["yes", True]
    with pytest.raises(IFBenchInputError, match=r"baseline\.json record 3"):
        prompt_result_from_record(record, "baseline.json record 3")
