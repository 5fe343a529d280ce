"""Generation: length-sorted batching keeps the caller's order, seeds make runs repeatable, alpaca_eval schema."""
from __future__ import annotations

import pytest

from steps.evaluate.generation import GenerationError, generate_outputs, resolve_backend

INSTRUCTIONS = [
    "Hi",
    "Write a very long and detailed story about a dragon who learns to cook pasta in a tiny kitchen.",
    "2+2?",
    "Name three colours of the rainbow, please.",
    "Explain gravity in one sentence to a small child who asks why apples fall from trees.",
]


def test_batched_greedy_matches_one_at_a_time_in_order(tokenizer):
    """Length-sorted, left-padded batches return each instruction's own answer at its own position."""
    from steps.models import load_model

    # untied embeddings: the tied tiny model greedily repeats the prompt's last token ("\n") everywhere
    model = load_model('tiny:{"tie_word_embeddings": false}', seed=0)
    kwargs = dict(generator="tiny", max_new_tokens=6, temperature=0.0, show_progress=False)
    batched = generate_outputs(model, tokenizer, INSTRUCTIONS, batch_size=2, **kwargs)
    single = generate_outputs(model, tokenizer, INSTRUCTIONS, batch_size=1, **kwargs)
    assert [r["instruction"] for r in batched] == INSTRUCTIONS
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert len({r["output"] for r in batched}) > 1  # not one answer copied everywhere


def test_seed_determinism(tiny_model_factory, tokenizer):
    model = tiny_model_factory()
    kwargs = dict(generator="tiny", max_new_tokens=8, batch_size=2, show_progress=False)
    first = generate_outputs(model, tokenizer, INSTRUCTIONS, seed=7, **kwargs)
    again = generate_outputs(model, tokenizer, INSTRUCTIONS, seed=7, **kwargs)
    other = generate_outputs(model, tokenizer, INSTRUCTIONS, seed=8, **kwargs)
    assert first == again
    assert [r["output"] for r in first] != [r["output"] for r in other]


def test_schema_fields(tiny_model_factory, tokenizer):
    model = tiny_model_factory()
    records = generate_outputs(model, tokenizer, INSTRUCTIONS[:2], generator="policy-x",
                               datasets=["koala", None], max_new_tokens=4, show_progress=False)
    assert set(records[0]) == {"instruction", "output", "generator", "dataset"}
    assert set(records[1]) == {"instruction", "output", "generator"}
    assert records[0]["generator"] == "policy-x" and records[0]["dataset"] == "koala"
    assert all(isinstance(r["output"], str) for r in records)
    assert "<|im_end|>" not in records[0]["output"]


def test_auto_backend_is_hf_here(tiny_model_factory):
    assert resolve_backend("auto", tiny_model_factory()) == "hf"
    with pytest.raises(GenerationError, match="unknown generation backend"):
        resolve_backend("tensorrt", None)


def test_bad_settings(tiny_model_factory, tokenizer):
    model = tiny_model_factory()
    with pytest.raises(GenerationError, match="instruction 1"):
        generate_outputs(model, tokenizer, ["ok", "  "], generator="g", show_progress=False)
    with pytest.raises(GenerationError, match="temperature"):
        generate_outputs(model, tokenizer, ["ok"], generator="g", temperature=-1, show_progress=False)
