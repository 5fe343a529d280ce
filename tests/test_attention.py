"""Attention masks from segment ids: their semantics against hand-built masks, the block sparsity flex attention
gets, and log-probs (with gradients) equal across SDPA, eager and flex attention and both pair layouts."""

from __future__ import annotations

import random

import pytest
import torch

from steps.train.attention import (
    FLEX,
    PADDING,
    block_mask,
    dense_mask,
    padded_row_segments,
    preferred_attn_implementation,
)
from steps.train.batching import PairExample, collate_pairs, collate_shared_prompt
from steps.train.logprobs import sequence_logprobs


def grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


def example(name: str, prompt: int, chosen: int, rejected: int, seed: int = 0) -> PairExample:
    rng = random.Random(f"{name}/{seed}")
    ids = [rng.randrange(5, 4000) for _ in range(prompt + chosen + rejected)]
    return PairExample(name, ids[:prompt], ids[prompt : prompt + chosen], ids[prompt + chosen :])


# (prompt, chosen, rejected) tokens of three pairs; the widest row is 7, the others get 2 padding positions
PAIRS = [(2, 2, 1), (1, 1, 3), (3, 2, 2)]
EXPECTED = [  # row q, column k: 1 = position q may attend to position k
    # P P C C R pad pad
    grid(["1000000", "1100000", "1110000", "1111000", "1100100", "0000010", "0000001"]),
    # P C R R R pad pad
    grid(["1000000", "1100000", "1010000", "1011000", "1011100", "0000010", "0000001"]),
    # P P P C C R R
    grid(["1000000", "1100000", "1110000", "1111000", "1111100", "1110010", "1110011"]),
]
EXPECTED_POSITIONS = [[0, 1, 2, 3, 2, 0, 0], [0, 1, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 3, 4]]


def test_shared_prompt_mask_is_the_hand_built_one():
    batch = collate_shared_prompt([example(str(i), *n) for i, n in enumerate(PAIRS)], pad_id=0)
    segments = batch.extra["segment_ids"]
    expected = torch.stack(EXPECTED)[:, None]
    assert torch.equal(dense_mask(segments), expected)
    assert batch.extra["position_ids"].tolist() == EXPECTED_POSITIONS
    # the block mask evaluates the same rule: its mask_mod over every (query, key) pair
    from torch.nn.attention.flex_attention import create_mask

    blocks = block_mask(segments)
    assert torch.equal(create_mask(blocks.mask_mod, 3, 1, 7, 7, device="cpu"), expected)


def test_mask_rules_hold_on_a_random_batch():
    """Rejected tokens never see chosen ones, padding sees nothing real and nothing sees padding, causal."""
    rng = random.Random(5)
    pairs = [example(str(i), rng.randrange(0, 9), rng.randrange(1, 9), rng.randrange(1, 9)) for i in range(6)]
    batch = collate_shared_prompt(pairs, pad_id=0)
    allowed = dense_mask(batch.extra["segment_ids"])[:, 0]
    width = allowed.shape[-1]
    for row, pair in zip(allowed, pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        chosen, rejected, real = slice(p, p + c), slice(p + c, p + c + r), p + c + r
        assert not row[rejected, chosen].any()
        assert row[rejected, :p].tril(diagonal=p).all() and row[chosen, :p].all()  # responses see the whole prompt
        assert not row[real:, :real].any() and not row[:real, real:].any()
        assert torch.equal(row[real:, real:], torch.eye(width - real, dtype=torch.bool))
        assert not row.triu(diagonal=1).any()


def test_padded_rows_mask_is_the_hand_built_one():
    segments = padded_row_segments(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert segments.tolist() == [[0, 0, 0, PADDING], [0, 0, 0, 0]]
    expected = [grid(["1000", "1100", "1110", "0001"]), grid(["1000", "1100", "1110", "1111"])]
    assert torch.equal(dense_mask(segments), torch.stack(expected)[:, None])


def test_block_mask_skips_the_blocks_nobody_attends_to():
    """Prompt 10, chosen 300, rejected 100 tokens: 128-token blocks; the rejected tokens in the last block see
    the prompt and the rejected tokens, never key block 1 (chosen tokens 128-255), and nothing looks ahead."""
    batch = collate_shared_prompt([example("long", 10, 300, 100)], pad_id=0)
    blocks = block_mask(batch.extra["segment_ids"]).to_dense()[0, 0]
    assert blocks.bool().tolist() == grid(["1000", "1100", "1110", "1011"]).tolist()


def test_the_batch_carries_no_dense_mask():
    """Everything a shared-prompt batch holds is at most one value per position (no [N, 1, L, L] tensor)."""
    pairs = [example(str(i), 40, 90 + i, 70) for i in range(4)]
    batch = collate_pairs(pairs, pad_id=0, share_prompt=True)
    n, width = batch.input_ids.shape
    tensors = [batch.input_ids, batch.attention_mask, batch.target_mask]
    tensors += [v for v in batch.extra.values() if torch.is_tensor(v)]
    assert all(t.dim() <= 2 and t.numel() <= n * width for t in tensors)
    assert batch.extra["segment_ids"].dtype == torch.int8


def test_flex_attention_on_cuda_sdpa_elsewhere():
    assert preferred_attn_implementation("cuda:0") == FLEX
    assert preferred_attn_implementation(torch.device("cpu")) == "sdpa"


# --- the same log-probs and gradients whichever attention computes them -------------------------------------

LENGTHS = [(9, 12, 7), (3, 20, 5), (14, 4, 11)]  # rows of different lengths: both layouts have padding


@pytest.fixture()
def eager_flex_on_cpu(monkeypatch):
    """Flex attention as transformers calls it, run eagerly on CPU, gradients included.

    transformers compiles flex attention on first use (about 100 s per shape on 2 CPU cores), and torch refuses
    flex attention's backward on CPU (``_validate_device``) although its eager backward is plain dense math on
    any device: both are patched here so the CPU runs the same mask, model and log-prob code as CUDA does."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention import flex_attention as torch_flex

    def eager(query, key, value, training=False, **kwargs):
        return torch_flex.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager)
    monkeypatch.setattr(torch_flex, "_validate_device", lambda query, key, value: None)


def logprobs_and_grads(
    implementation: str, layout: str, device: str = "cpu"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each row's mean token log-prob, and the gradients of a weighted sum of the rows' log-probs."""
    from steps.models import load_model

    model = load_model("tiny", seed=3, device=device, attn_implementation=implementation).train()
    pairs = [example(str(i), *n, seed=1) for i, n in enumerate(LENGTHS)]
    batch = collate_pairs(pairs, pad_id=0, share_prompt=layout == "shared_prompt").to(device)
    sums, counts = sequence_logprobs(model, batch)
    assert counts.tolist() == [c for _, c, _ in LENGTHS] + [r for _, _, r in LENGTHS]
    weights = torch.linspace(-1.0, 1.5, sums.numel(), device=device)  # every row enters the loss differently
    (sums * weights).sum().backward()
    grads = {name: p.grad.cpu() for name, p in model.named_parameters() if p.grad is not None}
    return (sums / counts).detach().cpu(), grads


def assert_same_logprobs_and_grads(
    got: tuple[torch.Tensor, dict[str, torch.Tensor]], expected: tuple[torch.Tensor, dict[str, torch.Tensor]]
) -> None:
    """Token log-probs within 1e-5; each gradient tensor within 1e-5 of its largest entry (see the test below)."""
    (means, grads), (expect_means, expect_grads) = got, expected
    torch.testing.assert_close(means, expect_means, rtol=0, atol=1e-5)
    assert grads.keys() == expect_grads.keys()
    for name, grad in grads.items():
        scale = float(expect_grads[name].abs().max())
        torch.testing.assert_close(grad, expect_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.fixture(scope="module")
def separate_rows_with_sdpa() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return logprobs_and_grads("sdpa", "separate")


@pytest.mark.parametrize(
    ("implementation", "layout"),
    [
        (FLEX, "shared_prompt"),
        (FLEX, "separate"),
        ("sdpa", "shared_prompt"),
        ("eager", "shared_prompt"),
        ("eager", "separate"),
    ],
)
def test_logprobs_and_gradients_equal_across_attention_paths(
    eager_flex_on_cpu, separate_rows_with_sdpa, implementation, layout
):
    """Against one row per response with SDPA and a 2-D padding mask (the model's own causal attention, no mask
    of ours), fp32. Token log-probs within 1e-5 (each row's mean: its sum, about -200 nats, is itself resolved
    only to ~1.5e-5 in fp32; a mask that let rejected tokens see chosen ones moves the sums by 0.2).
    Gradients: the paths sum attention in a different order, so they agree to fp32 rounding accumulated over
    ~100 positions and 2 layers: within 1e-5 of each tensor's largest entry (measured: below 1e-6 of it; the
    mask that lets rejected tokens see chosen ones moves every gradient tensor by 15-50 % of it)."""
    assert_same_logprobs_and_grads(logprobs_and_grads(implementation, layout), separate_rows_with_sdpa)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled flex attention kernels")
def test_compiled_flex_attention_on_cuda_matches_sdpa(monkeypatch):
    """The real CUDA path (compiled block masks, flex kernels) against SDPA on one row per response, on the same
    GPU, fp32 without TF32 (TF32 rounds matmul inputs to 10 mantissa bits: no 1e-5 comparison survives it)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    expected = logprobs_and_grads("sdpa", "separate", "cuda")
    for layout in ("shared_prompt", "separate"):
        assert_same_logprobs_and_grads(logprobs_and_grads(FLEX, layout, "cuda"), expected)
