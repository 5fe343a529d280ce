"""Summed token log-probabilities of the scored positions, in fp32: only the hidden states at scored positions
go through the vocabulary projection, in row tiles, inside one autograd function (``TokenLogProbs``), so no
[batch, length, vocab] logits tensor is ever built. Design notes and measurements: the comment below."""

from __future__ import annotations

from typing import Any

import torch

from steps.train.attention import FLEX, attn_implementation, block_mask, mask_for, padded_row_segments
from steps.train.batching import TokenBatch, separate_layout

# No separate log-softmax copy either, and the cross-entropy gradient is formed in place. For small models the
# projection onto a 49k vocabulary dominates the step, so this pays; for big ones it bounds memory.
#
# Backward has two modes (``recompute``):
#
# * keep (default): the forward turns each logits tile into probabilities in place and keeps them; the
#   backward turns them into the logits gradient in place. Three matmuls; M x V fp32 kept between passes.
# * recompute: the forward keeps only the log-partition per row; the backward recomputes each tile.
#   Four matmuls and nothing of size M x V kept: used when the kept tiles would exceed ``KEEP_LIMIT_BYTES``
#   (long sequences, big vocabularies). Without autograd (reference scores, evaluation) nothing is kept.
#
# Measured on 2 CPU cores, 1,100 scored rows, vocabulary 49,152 (forward + backward of the head alone):
# hidden 64: 0.37 s against 0.46 s for logits + cross-entropy per 1,024-row chunk; hidden 576: 1.25 s
# against 1.38 s. Recompute costs 1.2-2.6x more there, and tiles under 256 rows up to 4x more (the
# weight is streamed once per tile), so tiles are 1,024 rows.
#
# Batches built by ``collate_pairs(..., share_prompt=True)`` hold each pair's prompt once, followed by the
# chosen and the rejected response (each response attends to the prompt and to itself only, with its own
# position ids). They carry explicit (hidden row, target token, output row) triples; everything else works
# the same, and the returned sums are still one per logical row (chosen rows, then rejected rows). Their
# attention mask is built here, on the model's device, from per-token segment ids (steps/train/attention.py):
# a FlexAttention block mask for flex attention, a dense one for SDPA and eager; padded rows under flex
# attention get a block mask too.

CHUNK_ROWS = 1024  # rows per logits tile
KEEP_LIMIT_BYTES = 2 * 2**30  # recompute tiles in backward when kept probabilities would exceed this


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body (returns hidden states) and the output projection of a causal LM."""
    inner = model
    if hasattr(inner, "get_base_model"):  # peft wrapper
        inner = inner.get_base_model()
    head = inner.get_output_embeddings()
    body = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    if body is None or head is None:
        raise TypeError(f"{type(inner).__name__}: cannot find the decoder body and lm_head")
    return body, head


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into an fp32 accumulator without rounding a bf16 product to bf16 first."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # torch without out_dtype for this op
            pass
    acc.addmm_(a.float(), b.float())


class TokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[i, targets[i]] for each row i, in fp32, tiled over rows."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_rows: int,
        recompute: bool,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_z = torch.empty(n, dtype=torch.float32, device=hidden.device)
        kept = []
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            z = hidden[start:end].to(compute_dtype) @ w.t()
            if b is not None:
                z = z + b
            z = z.float()
            lz = torch.logsumexp(z, dim=-1)
            log_z[start:end] = lz
            out[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - lz
            if not recompute:
                kept.append(z.sub_(lz[:, None]).exp_())  # probabilities, in place of the logits
        ctx.chunk_rows, ctx.recompute, ctx.compute_dtype = chunk_rows, recompute, compute_dtype
        ctx.kept = kept
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        dtype, rows = ctx.compute_dtype, ctx.chunk_rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b and bias is not None else None
        )
        if not ctx.recompute and len(ctx.kept) != -(-hidden.shape[0] // rows):
            raise RuntimeError(
                "TokenLogProbs: backward ran twice through the same graph (its kept "
                "probabilities are turned into gradients in place); use recompute=True for that"
            )
        g = grad_out.float()
        for index, start in enumerate(range(0, hidden.shape[0], rows)):
            end = min(start + rows, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            if ctx.recompute:
                p = h @ w.t()
                if b is not None:
                    p = p + b
                p = p.float().sub_(log_z[start:end, None]).exp_()
            else:
                p = ctx.kept[index]
            # d log p(target) / d logits = onehot(target) - p, scaled by the incoming gradient
            gs = g[start:end]
            p.mul_(-gs[:, None])
            p.scatter_add_(1, targets[start:end, None], gs[:, None])
            gz = p.to(dtype)
            if grad_h is not None:
                grad_h[start:end] = (gz @ w).to(hidden.dtype)
            if grad_w is not None:
                _addmm_fp32(grad_w, gz.t(), h)
            if grad_b is not None:
                grad_b += p.sum(0)
        ctx.kept = []
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
        )


def token_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    recompute: bool | None = None,
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under the linear output layer ``head``, fp32, shape [M]."""
    weight: torch.Tensor = head.weight  # type: ignore[assignment]
    bias: torch.Tensor | None = getattr(head, "bias", None)
    vocab = weight.shape[0]
    rows = max(1, chunk_rows or CHUNK_ROWS)
    if recompute is None:
        recompute = bool(hidden.shape[0] * vocab * 4 > KEEP_LIMIT_BYTES)
    dtype = _compute_dtype(hidden.device, hidden.dtype)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return TokenLogProbs.apply(hidden, weight, bias, targets, rows, recompute or not needs_grad, dtype)


def _padding_mask(body: Any, batch: TokenBatch) -> Any:
    """The mask for right-padded rows: a block mask for flex attention (built on the batch's device); the 2-D
    padding mask for everything else (transformers then skips the mask where no row is padded)."""
    if attn_implementation(body) == FLEX:
        return block_mask(padded_row_segments(batch.attention_mask))
    return batch.attention_mask


def sequence_logprobs(
    model: Any, batch: TokenBatch, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sum of log p(token) over scored tokens [N] in fp32, number of scored tokens [N])."""
    from steps.train.parallel import is_root

    if is_root(model):  # the training root (bare, DDP, FSDP2): its forward runs the hooks, then comes back here
        return model(batch, chunk_rows)
    body, head = _decoder_and_head(model)
    tree_mask = None
    if "score_index" in batch.extra:
        dtype = next(body.parameters()).dtype
        tree_mask = mask_for(attn_implementation(body), batch.extra["segment_ids"], dtype)
        if tree_mask is None:
            batch = separate_layout(batch)
    if tree_mask is None:
        hidden = body(
            input_ids=batch.input_ids, attention_mask=_padding_mask(body, batch), use_cache=False
        ).last_hidden_state
        # token t is predicted from position t-1
        mask = batch.target_mask[:, 1:]
        rows, cols = mask.nonzero(as_tuple=True)
        selected = hidden[:, :-1][rows, cols]  # [M, H]
        targets = batch.input_ids[:, 1:][rows, cols]  # [M]
        n = batch.input_ids.shape[0]
        counts = mask.sum(dim=1).to(torch.float32)
    else:
        # shared-prompt layout: explicit (flat hidden index, target token, output row) triples
        hidden = body(
            input_ids=batch.input_ids,
            attention_mask=tree_mask,
            position_ids=batch.extra["position_ids"],
            use_cache=False,
        ).last_hidden_state
        flat_index, targets, rows = (batch.extra[k] for k in ("score_index", "score_targets", "score_rows"))
        selected = hidden.reshape(-1, hidden.shape[-1])[flat_index]
        n = batch.extra["num_rows"]
        counts = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add_(
            0, rows, torch.ones_like(rows, dtype=torch.float32)
        )
    lp = token_logprobs(selected, head, targets, chunk_rows)
    sums = torch.zeros(n, dtype=torch.float32, device=lp.device).index_add(0, rows, lp)
    return sums, counts


def reference_sequence_logprobs(model: Any, batch: TokenBatch) -> torch.Tensor:
    """The same sums with autograd off (reference model, dev evaluation)."""
    with torch.no_grad():
        return sequence_logprobs(model, batch)[0]
