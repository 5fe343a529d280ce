"""Who may attend to whom in a micro-batch, from one small per-token tensor (segment ids), and the mask each
attention implementation takes, built on the device where the attention runs.

A batch carries ``segment_ids`` ([N, L] int8): which part of its row each position holds. One rule,
:func:`may_attend`, turns them into attention; it is the same code whether it is evaluated densely
(:func:`dense_mask`, for SDPA and eager attention) or block by block (:func:`block_mask`, a FlexAttention
``BlockMask``: no [N, 1, L, L] tensor, so flash-style kernels skip the masked-out blocks). Which one a model gets
follows its attention implementation (:func:`mask_for`); which implementation to load for a device is
:func:`preferred_attn_implementation`, the one place that picks per device type.

Measured on a shared 2-core CPU (torch 2.13, transformers 5.25, fp32, one thread, CPU-seconds per forward of
the shared-prompt layout): FlexAttention on CPU has no backward at all (torch refuses it), so it cannot train
there. Forward only, SmolLM2-135M, 4 pairs x 512 tokens: SDPA with the dense mask 5.0 s, flex eager 9.2 s, flex
compiled (as transformers runs it) 7.1 s after a 28-95 s compile per new shape; 2 pairs x 1024: SDPA 6.3 s, flex
eager 15.0 s. The tiny model: SDPA 0.54 s, flex eager 0.72 s, compiled 0.51 s. So the CPU keeps SDPA with the
dense mask, built at the forward; CUDA gets FlexAttention with block masks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# segment ids: what part of a row a position holds
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3

FLEX = "flex_attention"


def may_attend(seg_q: torch.Tensor, seg_k: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """True where query position ``q_idx`` (segment ``seg_q``) may attend to key position ``kv_idx``.

    Causal; a real token sees the prompt and its own segment (so rejected tokens never see chosen ones, and rows
    without a shared prompt, all ``PROMPT``, are plain causal); padding is never seen, and a padding position
    sees only itself, so no softmax row is empty. Broadcasts: the same code builds dense masks and block masks.
    """
    real = (seg_q != PADDING) & (seg_k != PADDING)
    visible = (seg_k == PROMPT) | (seg_k == seg_q)
    return (real & visible & (q_idx >= kv_idx)) | (q_idx == kv_idx)


def padded_row_segments(attention_mask: torch.Tensor) -> torch.Tensor:
    """Segment ids of right-padded rows holding one sequence each (``attention_mask`` 1 = real token)."""
    real = torch.full(attention_mask.shape, PROMPT, dtype=torch.int8, device=attention_mask.device)
    return real.masked_fill_(attention_mask == 0, PADDING)


def dense_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[N, 1, L, L] boolean, True = may attend, on ``segment_ids``' device (N x L^2 bytes: build it late)."""
    positions = torch.arange(segment_ids.shape[1], device=segment_ids.device)
    allowed = may_attend(segment_ids[:, :, None], segment_ids[:, None, :], positions[:, None], positions[None, :])
    return allowed[:, None]


@functools.lru_cache(maxsize=1)
def _compiled_create_block_mask() -> Any:
    """``create_block_mask`` under torch.compile: the mask is evaluated block by block in fused kernels instead of
    materialising [N, 1, L, L] first (as the eager version does). Compiles once per shape family (fresh
    ``mask_mod`` closures over new segment tensors reuse the graph; lengths turn dynamic on the second shape)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def block_mask(segment_ids: torch.Tensor) -> Any:
    """A FlexAttention ``BlockMask`` for :func:`may_attend` over ``segment_ids``, built on their device.

    Compiled on CUDA (no dense intermediate); eager elsewhere, where flex attention itself only runs small
    forwards (tests, reference scoring) and compiling would cost minutes per shape."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = segment_ids.shape

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return may_attend(segment_ids[b, q_idx], segment_ids[b, kv_idx], q_idx, kv_idx)

    build = _compiled_create_block_mask() if segment_ids.is_cuda else create_block_mask
    return build(mask_mod, rows, None, length, length, device=segment_ids.device)


def attn_implementation(model: Any) -> str:
    """The attention implementation a Hugging Face model (or its body) runs: ``eager`` when it names none."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"


def mask_for(implementation: str, segment_ids: torch.Tensor, dtype: torch.dtype) -> Any:
    """The mask that ``implementation`` takes for ``segment_ids``: a ``BlockMask`` for flex attention, a dense
    boolean for SDPA, a dense additive ``dtype`` mask for eager, None for the rest (flash-attention & co. take
    no custom mask: callers fall back to one row per sequence and a 2-D padding mask)."""
    if implementation == FLEX:
        return block_mask(segment_ids)
    if implementation == "sdpa":
        return dense_mask(segment_ids)
    if implementation == "eager":
        allowed = dense_mask(segment_ids)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )
    return None


def preferred_attn_implementation(device: str | torch.device) -> str:
    """The attention implementation to load a model with on ``device`` when the config names none.

    CUDA: flex attention (block-sparse masks, flash-style kernels, no L^2 mask). Elsewhere SDPA with dense
    masks: on CPU flex attention has no backward and its compiled forward was slower (module docstring)."""
    return FLEX if torch.device(device).type == "cuda" else "sdpa"
