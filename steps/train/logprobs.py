"""Summed token log-probabilities of the scored positions, in fp32.

Only the hidden states at scored positions go through the vocabulary projection, in row chunks,
with fused cross-entropy: no [batch, length, vocab] fp32 logits tensor is ever materialised.
For small models the projection onto a 49k vocabulary dominates the step, so this pays.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from steps.train.batching import TokenBatch

CHUNK_ROWS = 1024


def _decoder_and_head(model):
    """The transformer body (returns hidden states) and the output projection of a causal LM."""
    inner = model
    if hasattr(inner, "get_base_model"):  # peft wrapper
        inner = inner.get_base_model()
    head = inner.get_output_embeddings()
    body = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    if body is None or head is None:
        raise TypeError(f"{type(inner).__name__}: cannot find the decoder body and lm_head")
    return body, head


def sequence_logprobs(model, batch: TokenBatch, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sum of log p(token) over scored tokens [N] in fp32, number of scored tokens [N])."""
    body, head = _decoder_and_head(model)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    # token t is predicted from position t-1
    mask = batch.target_mask[:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)
    selected = hidden[:, :-1][rows, cols]  # [M, H]
    targets = batch.input_ids[:, 1:][rows, cols]  # [M]
    token_lp = []
    for start in range(0, selected.shape[0], chunk_rows):
        logits = head(selected[start: start + chunk_rows]).float()
        token_lp.append(-F.cross_entropy(logits, targets[start: start + chunk_rows], reduction="none"))
    lp = torch.cat(token_lp) if token_lp else selected.new_zeros(0, dtype=torch.float32)
    n = batch.input_ids.shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, rows, lp)
    counts = mask.sum(dim=1).to(torch.float32)
    return sums, counts


def reference_sequence_logprobs(model, batch: TokenBatch) -> torch.Tensor:
    """The same sums with autograd off (reference model, dev evaluation)."""
    with torch.no_grad():
        return sequence_logprobs(model, batch)[0]
