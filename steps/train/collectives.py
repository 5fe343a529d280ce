"""Every collective the trainer issues goes through here, and each tensor is checked to live on the rank's device:
NCCL rejects CPU tensors (the old per-step metrics all-reduce failed at the end of step 1 on GPU) while gloo takes
anything, so ``check_placement`` makes that mistake fail on CPU too."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: (what, device type) of every collective issued through this module in this process (tests read it).
CALLS: Counter[tuple[str, str]] = Counter()


class CollectivePlacementError(RuntimeError):
    """A tensor handed to a collective does not live on the rank's device."""


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) unless torch.distributed is initialised (torchrun / @parallel)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """A process group exists (even of one rank: then DDP/FSDP and every collective really run)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _normalise(device: torch.device | str) -> torch.device:
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def placement_problem(tensor_device: torch.device | str, rank_device: torch.device | str) -> str | None:
    """Why a tensor on ``tensor_device`` cannot go to a collective of a rank computing on ``rank_device`` (or None).

    Pure: it compares devices only, so tests can ask about ``cuda:0`` on a machine without a GPU."""
    import torch

    have, want = torch.device(tensor_device), torch.device(rank_device)
    if have.type != want.type:
        return f"tensor on {have} but the rank computes on {want} (NCCL takes only CUDA tensors of the rank's device)"
    if want.index is not None and have.index is not None and have.index != want.index:
        return f"tensor on {have} but this rank's device is {want}"
    return None


def check_placement(tensor: torch.Tensor, rank_device: torch.device | str, what: str) -> None:
    """Raise :class:`CollectivePlacementError` unless ``tensor`` lives on ``rank_device``."""
    problem = placement_problem(tensor.device, rank_device)
    if problem is not None:
        raise CollectivePlacementError(f"{what}: {problem}; create the tensor with device=<the model's device>")


def all_reduce_sum(tensor: torch.Tensor, rank_device: torch.device | str, what: str, async_op: bool = False) -> Any:
    """In-place SUM over all ranks of a tensor on the rank's device; a no-op without a process group."""
    import torch.distributed as dist

    check_placement(tensor, rank_device, what)
    if not is_distributed():
        return None
    CALLS[(what, tensor.device.type)] += 1
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=async_op)


def broadcast_object(obj: Any, rank_device: torch.device | str, what: str) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small things such as a model's config); ``obj`` as given
    without a process group. Under NCCL the bytes travel through the rank's own GPU (the current device)."""
    import torch.distributed as dist

    if not is_distributed():
        return obj
    CALLS[(what, _normalise(rank_device).type)] += 1
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, rank_device: torch.device | str, what: str) -> list[Any]:
    """Every rank's ``obj`` in rank order (small records, e.g. per-rank memory figures); ``[obj]`` alone."""
    import torch.distributed as dist

    if not is_distributed():
        return [obj]
    CALLS[(what, _normalise(rank_device).type)] += 1
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier(rank_device: torch.device | str) -> None:
    """Wait for every rank; under NCCL on the rank's own GPU (so it never guesses device 0)."""
    import torch.distributed as dist

    if not is_distributed():
        return
    device = _normalise(rank_device)
    CALLS[("barrier", device.type)] += 1
    if device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def ddp_sum_hook() -> Callable[[Any, Any], Any]:
    """DDP communication hook (state = the rank's device): SUM the gradient bucket (DDP's default divides by the
    world size, which the loss normalisation already accounts for), through the same placement check."""

    def hook(rank_device, bucket):  # a type comment: DDP compares real annotations to GradBucket, never strings
        # type: (torch.device, torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]
        work = all_reduce_sum(bucket.buffer(), rank_device, "DDP gradient bucket", async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    return hook
