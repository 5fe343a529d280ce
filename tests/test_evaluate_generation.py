"""Generation: continuous batching equals one-prompt-at-a-time greedy decoding, keeps the caller's order, seeds
make runs repeatable, alpaca_eval schema."""

from __future__ import annotations

import math

import pytest
import torch

from steps.evaluate.decoding import (
    ContinuousBatchDecoder,
    DecodingError,
    nucleus_probabilities,
    supports_continuous_batching,
    unapplied_generation_settings,
)
from steps.evaluate.generation import GenerationError, generate_outputs, resolve_backend
from steps.evaluate.settings import GenerationSettings

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

    def greedy(batch_size: int) -> list[dict]:
        generation = GenerationSettings(max_new_tokens=6, temperature=0.0, batch_size=batch_size)
        return generate_outputs(
            model, tokenizer, INSTRUCTIONS, generator="tiny", generation=generation, show_progress=False
        )

    batched, single = greedy(2), greedy(1)
    assert [r["instruction"] for r in batched] == INSTRUCTIONS
    assert [r["output"] for r in batched] == [r["output"] for r in single]
    assert len({r["output"] for r in batched}) > 1  # not one answer copied everywhere


def test_seed_determinism(tiny_model_factory, tokenizer):
    model = tiny_model_factory()

    def sample(seed: int) -> list[dict]:
        generation = GenerationSettings(max_new_tokens=8, batch_size=2, seed=seed)  # temperature 0.9 by default
        return generate_outputs(
            model, tokenizer, INSTRUCTIONS, generator="tiny", generation=generation, show_progress=False
        )

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert [r["output"] for r in first] != [r["output"] for r in other]


def test_schema_fields(tiny_model_factory, tokenizer):
    model = tiny_model_factory()
    records = generate_outputs(
        model,
        tokenizer,
        INSTRUCTIONS[:2],
        generator="policy-x",
        datasets=["koala", None],
        generation=GenerationSettings(max_new_tokens=4),
        show_progress=False,
    )
    assert set(records[0]) == {"instruction", "output", "generator", "dataset"}
    assert set(records[1]) == {"instruction", "output", "generator"}
    assert records[0]["generator"] == "policy-x" and records[0]["dataset"] == "koala"
    assert all(isinstance(r["output"], str) for r in records)
    assert "<|im_end|>" not in records[0]["output"]


def test_auto_backend_is_hf_here(tiny_model_factory):
    assert resolve_backend("auto", tiny_model_factory()) == "hf"
    with pytest.raises(GenerationError, match="unknown generation backend"):
        resolve_backend("tensorrt", None)


@pytest.mark.parametrize(
    "instructions, datasets, message",
    [
        (["ok", "  "], None, "instruction 1 must be a non-empty string"),
        (["ok", 3], None, "instruction 1 must be a non-empty string"),
        (["ok"], ["koala", "vicuna"], "datasets has 2 entries for 1 instructions"),
    ],
)
def test_bad_inputs(tiny_model_factory, tokenizer, instructions, datasets, message):
    with pytest.raises(GenerationError, match=message):
        generate_outputs(
            tiny_model_factory(),
            tokenizer,
            instructions,
            generator="g",
            datasets=datasets,
            generation=GenerationSettings(max_new_tokens=2),
            show_progress=False,
        )


# --- the continuous-batching decode loop -----------------------------------------------------------------------------

PROMPT_LENGTHS = [2, 37, 5, 60, 11, 23, 1, 44]  # widely different, so rows of very different widths share the cache
MAX_NEW = 12


def _untied_tiny():
    from steps.models import load_model

    return load_model('tiny:{"tie_word_embeddings": false, "initializer_range": 0.3}', seed=0)


def _random_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(10, 49_000, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def _plain_greedy(model, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    """Reference: one prompt alone, the whole sequence through the model every step (no cache, no padding)."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stops:
                break
    return out


@pytest.fixture(scope="module")
def greedy_case():
    """Model, prompts, stop ids and the expected answers, whose lengths are forced to differ widely.

    Stop ids are taken from each prompt's own unstopped greedy continuation at chosen positions, so answers end
    after 2, 12 (the limit), 5, 10, 1, 12, 7 and 3 tokens (earlier if a stop id shows up sooner).
    """
    model = _untied_tiny()
    prompts = _random_prompts()
    unstopped = [_plain_greedy(model, p, MAX_NEW, set()) for p in prompts]
    cut_at = [1, None, 4, 9, 0, None, 6, 2]
    stops = {unstopped[i][k] for i, k in enumerate(cut_at) if k is not None}
    expected = [_plain_greedy(model, p, MAX_NEW, stops) for p in prompts]
    lengths = [len(e) for e in expected]
    assert len(set(lengths)) >= 5 and min(lengths) <= 2 and max(lengths) == MAX_NEW  # the case is really mixed
    return model, prompts, tuple(sorted(stops)), expected


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_continuous_batching_greedy_equals_plain_loop(greedy_case, batch_size):
    """Rows finish at different steps and waiting prompts are admitted mid-flight; every answer is still exactly
    the prompt's own argmax continuation, returned at the prompt's own position."""
    model, prompts, stops, expected = greedy_case
    settings = GenerationSettings(batch_size=batch_size, max_new_tokens=MAX_NEW, temperature=0.0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # admission order differs from output order
    finished = []
    decoder = ContinuousBatchDecoder(model, settings, stop_ids=stops, pad_id=0)
    outputs, stats = decoder.run(prompts, order, on_finished=finished.append)
    assert outputs == expected
    assert sorted(finished) == list(range(len(prompts)))
    total = sum(len(e) for e in expected)
    assert stats.generated_tokens == total and stats.prefill_tokens == sum(PROMPT_LENGTHS)
    # every token after a prompt's first comes from a decode step in which that row was live, and no other row was
    assert stats.row_steps == total - len(prompts)
    # columns that are padding for every live row are trimmed: the cache never outgrows the longest sequence
    assert stats.widest_cache <= max(len(p) + len(e) - 1 for p, e in zip(prompts, expected))
    if batch_size == 3:
        assert stats.prefill_calls > math.ceil(len(prompts) / batch_size)  # admitted one by one as rows freed up
        static_steps = sum(max(len(expected[i]) for i in order[k : k + 3]) - 1 for k in range(0, len(order), 3))
        assert stats.decode_steps < static_steps


def test_cache_outgrowing_its_spare_columns_changes_nothing(greedy_case, monkeypatch):
    """With 2 spare columns the cache buffers are reallocated every other step; the answers stay the same."""
    from steps.evaluate import decoding

    model, prompts, stops, expected = greedy_case
    monkeypatch.setattr(decoding, "SLACK_COLUMNS", 2)
    settings = GenerationSettings(batch_size=3, max_new_tokens=MAX_NEW, temperature=0.0)
    assert ContinuousBatchDecoder(model, settings, stop_ids=stops, pad_id=0).run(prompts)[0] == expected


def test_prompts_of_very_different_lengths_are_prefilled_apart_with_the_same_answers(greedy_case, monkeypatch):
    """With a padding limit of 10 columns the 8 prompts (lengths 1 to 60) admitted together need several prefill
    calls, each within the limit; every answer is still the prompt's own argmax continuation."""
    from steps.evaluate import decoding

    model, prompts, stops, expected = greedy_case
    monkeypatch.setattr(decoding, "PREFILL_PAD_LIMIT", 10)
    groups = decoding.prefill_groups([(i, len(p)) for i, p in enumerate(prompts)])
    # lengths 2, 37, 5, 60, 11, 23, 1, 44 in admission order: a new group wherever the spread would exceed 10
    assert groups == [[0], [1], [2], [3], [4], [5], [6], [7]]
    by_length = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # 60, 44, 37, 23, 11, 5, 2, 1
    assert decoding.prefill_groups([(i, len(prompts[i])) for i in by_length]) == [[3], [7, 1], [5], [4, 2, 0, 6]]
    settings = GenerationSettings(batch_size=8, max_new_tokens=MAX_NEW, temperature=0.0)
    outputs, stats = ContinuousBatchDecoder(model, settings, stop_ids=stops, pad_id=0).run(prompts, by_length)
    assert outputs == expected and stats.prefill_calls == 4 and stats.prefill_tokens == sum(PROMPT_LENGTHS)


def test_sampling_reproducible_and_per_prompt(greedy_case):
    """Same seed -> same samples; each prompt draws from its own generator, so batch size does not change them."""
    model, prompts, stops, _ = greedy_case

    def sample(batch_size: int, seed: int) -> list[list[int]]:
        settings = GenerationSettings(batch_size=batch_size, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=seed)
        return ContinuousBatchDecoder(model, settings, stop_ids=stops, pad_id=0).run(prompts)[0]

    first = sample(3, seed=5)
    assert sample(3, seed=5) == first
    assert sample(1, seed=5) == first
    assert sample(3, seed=6) != first
    assert len({tuple(o) for o in first}) == len(prompts)


def test_nucleus_probabilities_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.allclose(nucleus_probabilities(logits, 1.0, 1.0), probs)
    assert torch.allclose(nucleus_probabilities(logits, 1.0, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(nucleus_probabilities(logits, 1.0, 0.81), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    assert torch.allclose(nucleus_probabilities(logits, 1.0, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # temperature 2 on log-probabilities: p_i ** 0.5, renormalised
    roots = probs.sqrt()
    assert torch.allclose(nucleus_probabilities(logits, 2.0, 1.0), roots / roots.sum())


@pytest.mark.parametrize(
    "prompts, order, message",
    [
        ([[5, 6], []], None, "prompt 1 has no tokens"),
        ([[5, 6], [7]], [0, 0], "order must be a permutation of 0..1"),
    ],
)
def test_decoder_rejects_bad_prompts(greedy_case, prompts, order, message):
    decoder = ContinuousBatchDecoder(
        greedy_case[0], GenerationSettings(batch_size=2, max_new_tokens=2), stop_ids=(), pad_id=0
    )
    with pytest.raises(DecodingError, match=message):
        decoder.run(prompts, order)


def test_unapplied_generation_settings_are_reported():
    model = _untied_tiny()
    assert unapplied_generation_settings(model) == {}
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 3
    assert unapplied_generation_settings(model) == {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}


def test_sliding_window_model_falls_back_to_generate(tokenizer):
    """A cache the loop does not handle (sliding-window layers) goes through model.generate, same answers."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    assert not supports_continuous_batching(model)
    assert supports_continuous_batching(_untied_tiny())

    def greedy(batch_size: int) -> list[dict]:
        generation = GenerationSettings(max_new_tokens=4, temperature=0.0, batch_size=batch_size)
        return generate_outputs(
            model, tokenizer, INSTRUCTIONS, generator="mistral", generation=generation, show_progress=False
        )

    batched, single = greedy(2), greedy(1)
    assert [r["output"] for r in batched] == [r["output"] for r in single]
