"""Model FLOPs of a training step (6N per token plus causal attention), device peaks and MFU.

The counting convention and its justification are in the comment block below; the tests check it by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

# What is counted (model FLOPs, PaLM's MFU convention: a property of the model and the tokens, not of an
# implementation, so both sides are charged the same for the same sequences):
#
# * N = matmul parameters = the weights of every nn.Linear, the output projection (lm_head) included even
#   when it is tied to the embedding; the embedding lookup is a gather, not a matmul, and is left out, as are
#   biases and norms (O(d) per token). LoRA adapters are nn.Linear too and count.
# * Forward of one sequence of T tokens: 2 N T for the weight matmuls (one multiply-add per weight per token)
#   plus attention. Under causal masking the query at position i (1-based) scores against i keys: QK^T costs
#   2 d_attn i per layer and the softmax-weighted sum of V the same, where d_attn = query heads x head_dim
#   (grouped-query attention shares K/V heads, but every query head still does its own products). Summed over
#   i = 1..T: A(T) = 2 L d_attn T (T + 1), i.e. per token 2 * 2 * L * d_attn * T_ctx with T_ctx = (T + 1) / 2,
#   the mean number of keys a token sees. We count the causal half, not the full T^2 that PaLM's and
#   torchtitan's 12 L H Q T term counts: a causal kernel must do only this half, and it keeps short and long
#   sequences comparable. Padding is never counted: lengths are real (non-padding) tokens.
# * Backward: every forward matmul Y = X W needs dX = dY W^T (same cost) and, only if W trains, dW = X^T dY
#   (same cost). Attention's two matmuls have activations on both sides: backward is twice forward. So one
#   trained sequence costs (4 N + 2 N_trainable) T + 3 A(T): 6 N T + 3 A(T) for full fine-tuning, about
#   4 N T + 3 A(T) with LoRA (frozen weights still pass gradients down to the adapters; the few matmuls below
#   the lowest adapter that need no input gradient are ignored).
# * A reference forward (DPO) adds 2 N_ref T + A(T) per sequence, N_ref = the matmul parameters of the frozen
#   reference (the model without adapters), whether it is precomputed or run live.
# * Work an implementation avoids is not subtracted: a prompt shared by chosen and rejected counts once per
#   sequence, and the vocabulary projection counts at every position (PrefFlow projects only scored ones).
#   Skipping work therefore shows up as higher achieved model FLOP/s, which is what MFU is meant to reward.


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs: N = weights of every nn.Linear (lm_head included, embedding lookup not),
    how many of those train, and the layers and query width (heads x head_dim) attention runs at."""

    matmul_params: int
    trainable_matmul_params: int
    n_layers: int
    attn_dim: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def model_shape(model: PreTrainedModel) -> ModelShape:
    """The :class:`ModelShape` of a causal LM (a peft wrapper included), read from its modules and config."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear: cannot count matmul FLOPs")
    config = model.config
    n_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ModelShape(
        matmul_params=sum(m.weight.numel() for m in linears),
        trainable_matmul_params=sum(m.weight.numel() for m in linears if m.weight.requires_grad),
        n_layers=int(config.num_hidden_layers),
        attn_dim=n_heads * int(head_dim),
    )


def gemm_shapes(model: torch.nn.Module) -> list[list[int]]:
    """``[in_features, out_features, count]`` for each distinct nn.Linear shape (what the CPU probe times)."""
    import torch

    counts: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            key = (m.in_features, m.out_features)
            counts[key] = counts.get(key, 0) + 1
    return [[i, o, c] for (i, o), c in sorted(counts.items())]


def attention_flops(shape: ModelShape, length: int) -> int:
    """Causal score and value matmuls of one forward over ``length`` tokens: 2 L d_attn T (T + 1)."""
    return 2 * shape.n_layers * shape.attn_dim * length * (length + 1)


def forward_flops(shape: ModelShape, lengths: Iterable[int]) -> int:
    """One forward over sequences of these lengths (a reference pass): sum of 2 N T + A(T)."""
    return sum(2 * shape.matmul_params * t + attention_flops(shape, t) for t in lengths)


def train_flops(shape: ModelShape, lengths: Iterable[int]) -> int:
    """Forward and backward over these sequences: sum of (4 N + 2 N_trainable) T + 3 A(T)."""
    per_token = 4 * shape.matmul_params + 2 * shape.trainable_matmul_params
    return sum(per_token * t + 3 * attention_flops(shape, t) for t in lengths)


def step_flops(policy: ModelShape, reference: ModelShape | None, step_lengths: list[list[int]]) -> dict[str, Any]:
    """Train (and reference-forward) FLOPs of the measured steps, each step given as its sequence lengths."""
    lengths = [t for step in step_lengths for t in step]
    return {
        "train_flops": train_flops(policy, lengths),
        "reference_flops": forward_flops(reference, lengths) if reference is not None else 0,
        "policy_shape": policy.to_dict(),
        "reference_shape": reference.to_dict() if reference else None,
    }


# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s with fp32 accumulate, from the vendors' data sheets
# (NVIDIA prints the sparse figure first; dense is half of it). Matched on torch.cuda.get_device_name() as a
# whole word, most specific first. Unknown devices get no MFU rather than a guess.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),  # GB200 NVL72 data sheet: 360 PFLOPS FP16/BF16 with sparsity for 72 GPUs
    ("B200", 2250.0),  # HGX B200 data sheet: 36 PFLOPS FP16/BF16 with sparsity for 8 GPUs
    ("GH200", 989.0),  # GH200 data sheet: 1,979 TFLOPS with sparsity (the H100/H200 SXM tensor cores)
    ("H200 NVL", 835.0),  # H200 data sheet, NVL: 1,671 TFLOPS with sparsity
    ("H200", 989.0),  # H200 data sheet, SXM: 1,979 TFLOPS with sparsity
    ("H100 NVL", 835.0),  # H100 data sheet, NVL: 1,671 TFLOPS with sparsity
    ("H100 PCIe", 756.0),  # H100 data sheet, PCIe: 1,513 TFLOPS with sparsity
    ("H100", 989.0),  # H100 data sheet, SXM ("NVIDIA H100 80GB HBM3"): 1,979 TFLOPS with sparsity
    ("H800 PCIe", 756.0),  # as H100 PCIe
    ("H800", 989.0),  # as H100 SXM
    ("A100", 312.0),  # A100 data sheet (SXM and PCIe): 312 | 624 with sparsity
    ("A800", 312.0),  # as A100
    ("L40S", 362.0),  # L40S data sheet: 362.05 | 733 with sparsity
    ("L40", 181.0),  # L40 data sheet: 181.05 | 362.1 with sparsity
    ("L4", 121.0),  # L4 data sheet: 242 TFLOPS with sparsity
    ("A10G", 70.0),  # AWS-only part, no NVIDIA data sheet; 70 TFLOPS is the figure quoted for it beside the A10
    ("A10", 125.0),  # A10 data sheet: 125 | 250 with sparsity
    ("RTX 6000 Ada", 364.0),  # RTX 6000 Ada data sheet: 1,457 TFLOPS FP8 with sparsity -> 364 dense BF16
    ("A6000", 155.0),  # RTX A6000 data sheet: 154.8 | 309.7 with sparsity
    ("RTX 4090", 165.0),  # Ada (AD102) whitepaper, RTX 4090: 165.2 | 330.4 with sparsity (fp32 accumulate)
    ("RTX 3090", 71.0),  # Ampere GA102 whitepaper, RTX 3090: 71 | 142 with sparsity (fp32 accumulate)
    ("MI300X", 1307.4),  # AMD Instinct MI300X data sheet: 1,307.4 TFLOPS dense BF16
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device name (``torch.cuda.get_device_name``), or None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key) + r"(?![A-Za-z0-9])", device_name, flags=re.IGNORECASE):
            return tflops * 1e12
    return None


def mfu(flops_per_s: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None when either is unknown)."""
    if not flops_per_s or not peak_flops:
        return None
    return flops_per_s / peak_flops
