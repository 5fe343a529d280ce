"""The oldest torch the trainer runs on, and why: every torch API it relies on beyond the basics, with the release that
has it. pyproject.toml's ``torch>=`` requirement is :data:`TORCH_FLOOR` (a test keeps the two equal and checks the
installed torch against :data:`TORCH_APIS`; ``parallel.prepare`` refuses an older torch with one clear line).

Checked against the released sources of torch 2.6, 2.7 and 2.8: everything below is in 2.6 except FSDP2's
``set_gradient_divide_factor`` and ``set_force_sum_reduction_for_comms`` (absent in 2.7, present in 2.8), which
make gradients plain sums over ranks on every backend (gloo has no PREMUL_SUM): hence 2.8."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

TORCH_FLOOR = "2.8"


@dataclass(frozen=True)
class TorchApi:
    """``module``'s ``name`` (dotted for an attribute of a class; ``name(param)`` for a keyword of a callable)."""

    module: str
    name: str
    why: str
    since: str


TORCH_APIS: tuple[TorchApi, ...] = (
    TorchApi("torch.distributed.fsdp", "fully_shard", "FSDP2 sharding, public in torch.distributed.fsdp", "2.6"),
    TorchApi("torch.distributed.fsdp", "MixedPrecisionPolicy", "FSDP2 compute in bf16, gradients in fp32", "2.6"),
    TorchApi(
        "torch.distributed.fsdp",
        "FSDPModule.set_gradient_divide_factor",
        "gradients summed over ranks (the loss is already divided by the global denominator)",
        "2.8",
    ),
    TorchApi(
        "torch.distributed.fsdp",
        "FSDPModule.set_force_sum_reduction_for_comms",
        "plain SUM reductions (gloo has no PREMUL_SUM)",
        "2.8",
    ),
    TorchApi(
        "torch.distributed.fsdp",
        "FSDPModule.set_requires_all_reduce",
        "HSDP accumulation: reduce-scatter each micro-batch, all-reduce across nodes once per step",
        "2.6",
    ),
    TorchApi(
        "torch.distributed.checkpoint.state_dict",
        "StateDictOptions(broadcast_from_rank0)",
        "rank 0 reads the weights, the others receive them after sharding",
        "2.6",
    ),
    TorchApi("torch.distributed.checkpoint.state_dict", "set_model_state_dict", "loading weights into shards", "2.6"),
    TorchApi("torch.distributed.tensor", "DTensor", "sharded parameters and gradients (public module)", "2.6"),
    TorchApi("torch.distributed", "init_process_group(device_id)", "NCCL bound to the rank's GPU", "2.6"),
    TorchApi("torch", "get_autocast_dtype", "the log-prob head computes in autocast's dtype", "2.6"),
    TorchApi(
        "torch.nn.attention.flex_attention",
        "create_block_mask",
        "attention masks as FlexAttention block masks on CUDA",
        "2.6",
    ),
)


def _has(api: TorchApi) -> bool:
    try:
        target: object = importlib.import_module(api.module)
    except ImportError:
        return False
    name, _, param = api.name.partition("(")
    for part in name.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    if not param:
        return True
    try:
        return param.rstrip(")") in inspect.signature(target).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def missing_torch_apis() -> list[str]:
    """The APIs of :data:`TORCH_APIS` this torch lacks, each with what it is for and the release that has it."""
    return [f"{a.module}.{a.name} ({a.why}; torch >= {a.since})" for a in TORCH_APIS if not _has(a)]


def check_torch() -> None:
    """Refuse a torch older than the floor, naming what it lacks and the fix."""
    missing = missing_torch_apis()
    if missing:
        import torch

        raise RuntimeError(
            f"torch {torch.__version__} lacks {'; '.join(missing)}: install torch>={TORCH_FLOOR} "
            "(pyproject.toml's floor)"
        )
