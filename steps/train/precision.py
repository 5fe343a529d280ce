"""Mixed precision as fairseq2 does it: fp32 master weights and AdamW state, bf16 compute. ``model.dtype`` is the
compute dtype, ``model.master_dtype`` the weights'; single device and DDP compute under ``torch.autocast`` (CPU
too), FSDP2 casts through its MixedPrecisionPolicy."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """Compute dtype (matmuls, activations) and master dtype (weights, gradients, AdamW state) on a device type."""

    compute: torch.dtype
    master: torch.dtype
    device_type: str

    @property
    def mixed(self) -> bool:
        return self.compute != self.master

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the compute dtype when it differs from the weights' dtype (else nothing)."""
        import torch

        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def describe(self) -> str:
        def name(d: torch.dtype) -> str:
            return str(d).removeprefix("torch.")

        if not self.mixed:
            return f"{name(self.compute)} ({self.device_type})"
        return f"{name(self.compute)} compute, {name(self.master)} master weights ({self.device_type})"


def resolve_precision(compute: str, master: str, device: torch.device) -> Precision:
    """The run's precision from ``model.dtype`` (auto: bf16 on a CUDA GPU that supports it, else fp32) and
    ``model.master_dtype``. Compute is never wider than the master weights."""
    from steps.models.load import resolve_dtype, torch_dtype

    master_dtype = torch_dtype(master)
    compute_dtype = torch_dtype(resolve_dtype(compute, device))
    if master_dtype.itemsize < compute_dtype.itemsize:
        if compute != "auto":
            raise ValueError(
                f"model.dtype {compute} is wider than model.master_dtype {master}: "
                "compute cannot be more precise than the weights; use model.dtype: bfloat16"
            )
        compute_dtype = master_dtype
    precision = Precision(compute_dtype, master_dtype, device.type)
    if master_dtype != torch_dtype("float32"):
        logger.warning(
            "model.master_dtype %s: weights and AdamW state are kept in %s; updates smaller than its rounding step "
            "are lost (DPO at lr 1e-8 barely moves bf16 weights). Use float32 unless memory forces this.",
            master,
            master,
        )
    logger.info("precision: %s", precision.describe())
    return precision


def default_precision(model: Any) -> Precision:
    """For callers that pass none (benchmarks, notebooks): the weights' dtype is the master dtype; fp32 weights on
    a bf16-capable CUDA GPU compute in bf16, everything else computes in the weights' dtype."""
    import torch

    param = next(model.parameters())
    device = param.device
    compute = param.dtype
    if device.type == "cuda" and param.dtype == torch.float32 and torch.cuda.is_bf16_supported():
        compute = torch.bfloat16
    return Precision(compute, param.dtype, device.type)


def enable_tf32(device: Any) -> bool:
    """fp32 matmuls on TF32 tensor cores when training on a CUDA device (what remains fp32 under bf16 autocast,
    and every matmul of an fp32-compute run), as torchtitan does; nothing elsewhere (the setting is process-wide and
    a CPU run keeps full fp32). Returns whether it was set."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    if torch.get_float32_matmul_precision() != "high":
        torch.set_float32_matmul_precision("high")
        logger.info("fp32 matmuls on CUDA use TF32 (torch.set_float32_matmul_precision('high'))")
    return True
