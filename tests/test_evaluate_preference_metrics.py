"""Held-out preference metrics on the tiny model, checked against log-probs computed independently with a plain
full-logits log_softmax loop over each whole sequence."""

from __future__ import annotations

import math

import pytest
import torch

from steps.evaluate.generation import ModelRun
from steps.evaluate.preference_metrics import HeldoutScoring, PreferenceDataError, heldout_preference_metrics

ROWS = [
    {
        "id": "a",
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": "Paris.",
        "rejected": "It is Lyon, a large city in the south-east of the country, on the Rhone.",
    },
    {
        "id": "b",
        "prompt": [{"role": "user", "content": "Name a prime number."}],
        "chosen": "Seven is a prime number because it has no divisors other than one and itself.",
        "rejected": "Eight.",
    },
    {"id": "c", "prompt": [{"role": "user", "content": "Say hello."}], "chosen": "Hello!", "rejected": "Hello, world."},
    {
        "id": "d",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "Five"}],
    },
    {"id": "e", "prompt": [{"role": "user", "content": "Spell cat."}], "chosen": "C-A-T", "rejected": "C-A-T"},
]


def _text(value):
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def _plain_logp(model, tokenizer, messages, response):
    """Sum of log p(token) over the response and its end token, from full logits of the whole sequence."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = 0.0
    for position in range(len(prompt_ids), ids.shape[1]):
        total += float(logprobs[position - 1, ids[0, position]])
    return total, len(response_ids)


@pytest.fixture(scope="module")
def models():
    from steps.models import load_model

    return load_model("tiny", seed=1), load_model("tiny", seed=2)


def test_metrics_match_independent_logprobs(models, tokenizer):
    policy, reference = models
    beta = 0.25
    result = heldout_preference_metrics(
        "tiny",
        ROWS,
        HeldoutScoring(max_seq_len=2048, overlength="truncate", mask_source_tokens=True, beta=beta, max_num_tokens=300),
        ModelRun(model=policy, tokenizer=tokenizer, show_progress=False),
        reference="tiny:ref",
        reference_model=reference,
        return_per_pair=True,
    )
    expected = []
    for row in ROWS:
        c, nc = _plain_logp(policy, tokenizer, row["prompt"], _text(row["chosen"]))
        r, nr = _plain_logp(policy, tokenizer, row["prompt"], _text(row["rejected"]))
        rc, _ = _plain_logp(reference, tokenizer, row["prompt"], _text(row["chosen"]))
        rr, _ = _plain_logp(reference, tokenizer, row["prompt"], _text(row["rejected"]))
        expected.append((c, r, nc, nr, rc, rr))
    per_pair = result.per_pair
    assert [p["id"] for p in per_pair] == [row["id"] for row in ROWS]
    for got, (c, r, nc, nr, rc, rr) in zip(per_pair, expected):
        assert got["chosen_logp"] == pytest.approx(c, abs=2e-4) and got["rejected_logp"] == pytest.approx(r, abs=2e-4)
        assert (got["chosen_tokens"], got["rejected_tokens"]) == (nc, nr)
        assert got["reference_chosen_logp"] == pytest.approx(rc, abs=2e-4)
        assert got["reference_rejected_logp"] == pytest.approx(rr, abs=2e-4)

    n = len(ROWS)
    accuracy = sum(c > r for c, r, *_ in expected) / n
    normalized = sum(c / nc > r / nr for c, r, nc, nr, *_ in expected) / n
    margins = [beta * ((c - rc) - (r - rr)) for c, r, _, _, rc, rr in expected]
    assert result.n_pairs == n and result.n_ties == 1  # row e: the same answer twice
    assert result.preference_accuracy == pytest.approx(accuracy)
    assert result.preference_accuracy_normalized == pytest.approx(normalized)
    assert result.preference_accuracy_se == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / n))
    assert result.reward_accuracy == pytest.approx(sum(m > 0 for m in margins if abs(m) > 1e-6) / n)
    assert result.reward_margin_mean == pytest.approx(sum(margins) / n, abs=1e-4)
    assert result.beta == beta and result.reference == "tiny:ref"
    assert 0 < accuracy < 1 and normalized != accuracy  # the rows tell the two scores apart


def test_without_reference_only_preference_accuracy(models, tokenizer):
    policy, _ = models
    run = ModelRun(model=policy, tokenizer=tokenizer, show_progress=False)
    result = heldout_preference_metrics(
        "tiny", ROWS[:3], HeldoutScoring(max_seq_len=2048, overlength="drop", mask_source_tokens=True), run
    )
    assert result.reward_accuracy is None and result.reward_margin_mean is None and result.beta is None
    expected = [
        (
            _plain_logp(policy, tokenizer, r["prompt"], r["chosen"])[0],
            _plain_logp(policy, tokenizer, r["prompt"], r["rejected"])[0],
        )
        for r in ROWS[:3]
    ]
    assert result.preference_accuracy == pytest.approx(sum(c > r for c, r in expected) / 3)
    # a reference but no beta (a loss without one): accuracies only, and the result says no reference was used
    unscaled = heldout_preference_metrics(
        "tiny",
        ROWS[:3],
        HeldoutScoring(max_seq_len=2048, overlength="drop", mask_source_tokens=True),
        run,
        reference="tiny:ref",
    )
    assert unscaled.reference is None and unscaled.reward_accuracy is None
    assert unscaled.preference_accuracy == result.preference_accuracy


def test_loads_by_spec_and_counts_dropped_pairs(tokenizer):
    """By spec (loads tiny itself); pairs longer than max_seq_len are dropped and counted, as training does."""
    long_row = dict(ROWS[0], id="long", rejected="word " * 200)
    drop = HeldoutScoring(max_seq_len=96, overlength="drop", mask_source_tokens=True)
    cpu = ModelRun(device="cpu", show_progress=False)
    result = heldout_preference_metrics("tiny", [long_row, ROWS[1]], drop, cpu)
    assert result.n_rows == 2 and result.n_pairs == 1 and result.n_dropped_overlength == 1
    from steps.models import load_model

    policy = load_model("tiny", seed=0)
    c, _ = _plain_logp(policy, tokenizer, ROWS[1]["prompt"], ROWS[1]["chosen"])
    r, _ = _plain_logp(policy, tokenizer, ROWS[1]["prompt"], ROWS[1]["rejected"])
    assert result.preference_accuracy == float(c > r)
    empty = heldout_preference_metrics("tiny", [long_row], drop, cpu)
    assert empty.n_pairs == 0 and empty.preference_accuracy is None


def test_bad_rows_name_the_row(tokenizer):
    scoring, run = (
        HeldoutScoring(max_seq_len=256, overlength="drop", mask_source_tokens=True),
        ModelRun(tokenizer=tokenizer),
    )
    with pytest.raises(PreferenceDataError, match="preference row 1 needs 'prompt', 'chosen' and 'rejected'"):
        heldout_preference_metrics("tiny", [ROWS[0], {"prompt": []}], scoring, run)
    with pytest.raises(PreferenceDataError, match="preference row 0: 'chosen' must be a string"):
        heldout_preference_metrics("tiny", [dict(ROWS[0], chosen=3)], scoring, run)
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        HeldoutScoring(max_seq_len=256, overlength="drop", mask_source_tokens=True, beta=0.0)
    with pytest.raises(ValueError, match="overlength must be 'drop' or 'truncate'"):
        HeldoutScoring(max_seq_len=256, overlength="cut", mask_source_tokens=True)  # type: ignore[arg-type]


def test_scoring_follows_the_variants_own_training_section():
    """Held-out pairs are cut as the variant trained (its max_seq_len, overlength, prompt masking) and rewards
    scaled by its loss's beta; SFT has no loss config, so no beta (and no reward metrics)."""
    from steps.config import PreferenceConfig, SFTConfig

    dpo = PreferenceConfig(criterion="dpo", criterion_config={"beta": 0.25}, max_seq_len=384, overlength="truncate")
    scoring = HeldoutScoring.for_variant(dpo, max_pairs=7)
    assert (scoring.max_seq_len, scoring.overlength, scoring.beta, scoring.max_pairs) == (384, "truncate", 0.25, 7)
    sft = HeldoutScoring.for_variant(SFTConfig(max_seq_len=512, mask_source_tokens=False), max_pairs=None)
    assert (sft.max_seq_len, sft.overlength, sft.mask_source_tokens, sft.beta) == (512, "drop", False, None)
