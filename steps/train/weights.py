"""How the ranks of a job get their weights, as torchtitan does it: under a process group only global rank 0 reads the
model (``load_model``, on the CPU in the master dtype); every rank builds the same architecture with its parameters on
the meta device, spreads it (FSDP2 shards, or a DDP replica), materialises it on its own device and receives the
weights from rank 0 by broadcast (``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)``).
A node then holds about one copy of the model in host memory instead of one per rank. Every rank logs its host RSS
over the load (VmHWM/VmRSS from /proc/self/status)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steps.train import collectives

logger = logging.getLogger(__name__)

STATUS_FILE = Path("/proc/self/status")
CLEAR_REFS_FILE = Path("/proc/self/clear_refs")
MIB = 2**20


def host_memory() -> dict[str, float]:
    """This process's resident set now (``rss``) and its peak (``hwm``), MiB; empty where /proc is unavailable."""
    try:
        lines = STATUS_FILE.read_text().splitlines()
    except OSError:
        return {}
    fields = {"VmRSS": "rss", "VmHWM": "hwm"}
    out: dict[str, float] = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = int(value.split()[0]) / 1024  # kB
    return out


def reset_peak_memory() -> bool:
    """Restart the peak (VmHWM) from the current RSS (Linux: ``5`` to /proc/self/clear_refs), so the peak read after
    a load is the load's own. False where that is not possible (then the peak may predate the load)."""
    try:
        CLEAR_REFS_FILE.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PendingWeights:
    """A model built on the meta device whose weights are still to come (:func:`materialise`): rank 0 holds the full
    state dict (Hugging Face keys, CPU, master dtype), the other ranks nothing; ``buffers`` are rank 0's."""

    spec: str
    device: torch.device
    state: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    memory_before: dict[str, float] = field(default_factory=dict)
    peak_reset: bool = False
    started: float = field(default_factory=time.monotonic)


def read_on_rank0(
    spec: str, dtype: torch.dtype, device: torch.device, *, attn_implementation: str | None = None, seed: int = 0
) -> tuple[Any, PendingWeights]:
    """``(model on the meta device, its pending weights)`` on every rank; only global rank 0 reads ``spec``.

    Rank 0 loads as ``load_model`` does (CPU, ``dtype``) and sends the blueprint (class, configs, buffers) to the
    others; every rank then builds the same empty model. Call under a process group, on every rank."""
    from steps.models.load import blueprint_of, build_empty, load_model

    _import_machinery()  # module imports are not the load: the baseline is taken after them
    peak_reset = reset_peak_memory()
    memory_before = host_memory()
    started = time.monotonic()
    rank, world_size = collectives.world()
    state: dict[str, torch.Tensor] = {}
    blueprint = None
    if rank == 0:
        loaded = load_model(spec, dtype=dtype, device="cpu", seed=seed, attn_implementation=attn_implementation)
        blueprint = blueprint_of(loaded)
        state = loaded.state_dict()  # the tensors outlive the module: one copy, freed once broadcast
        del loaded
    blueprint = collectives.broadcast_object(blueprint, device, "model blueprint")
    model = build_empty(blueprint)
    logger.info(
        "rank %d of %d: %s built on the meta device; %s",
        rank,
        world_size,
        blueprint.cls.__name__,
        "weights read here, broadcast once the model is spread" if rank == 0 else "weights will come from rank 0",
    )
    pending = PendingWeights(spec, device, state, blueprint.buffers, memory_before, peak_reset, started)
    return model, pending


def _import_machinery() -> None:
    """Import what loading uses (transformers, accelerate, torch.distributed.checkpoint, FSDP2) up front."""
    import accelerate  # noqa: F401
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp  # noqa: F401
    import transformers.modeling_utils  # noqa: F401


def materialise(root: torch.nn.Module, lm: Any, pending: PendingWeights, key_prefix: str, sharded: bool) -> dict:
    """Give ``root`` (already sharded by FSDP2, or a plain module around ``lm``) real storage on the rank's device,
    restore ``lm``'s buffers and load rank 0's weights into it by broadcast; returns this rank's host-memory record.

    ``to_empty`` makes new parameters, which unties tied embeddings of an unsharded model (FSDP2 keeps one sharded
    parameter for both): they are tied again before the weights arrive. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from steps.models.load import restore_buffers

    root.to_empty(device=pending.device)
    if not sharded:
        lm.tie_weights()
    restore_buffers(lm, pending.buffers)
    full: dict[str, Any] = {key_prefix + k: v for k, v in pending.state.items()}
    pending.state.clear()
    set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    check_tied(lm)
    return memory_record(root, pending)


def check_tied(lm: Any) -> None:
    """Tied input and output embeddings must still be one tensor after materialising (else they train apart)."""
    config = getattr(lm, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
    if out is not None and inp is not None and out.weight is not inp.weight:
        raise RuntimeError(f"{type(lm).__name__}: tied embeddings came apart while materialising the model")


def local_host_bytes(module: torch.nn.Module) -> int:
    """Bytes of this rank's parameters and buffers that live in host memory (its shard under FSDP2; 0 on a GPU)."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):  # each shared (tied) parameter once
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.device.type == "cpu":
            total += local.numel() * local.element_size()
    return total


def memory_record(root: torch.nn.Module, pending: PendingWeights) -> dict:
    """This rank's host memory over the load: the peak's growth (VmHWM after minus VmRSS before), the part of it that
    is the rank's own weights in host memory (a CPU device keeps its shard there; a GPU keeps nothing), and the rest
    (what reading, building and receiving the weights cost on top: the figure one copy per node is about)."""
    rank = collectives.world()[0]
    after = host_memory()
    own = local_host_bytes(root) / MIB
    record: dict[str, Any] = {"rank": rank, "seconds": round(time.monotonic() - pending.started, 2)}
    if after and pending.memory_before:
        growth = after["hwm"] - pending.memory_before["rss"]
        record.update(
            rss_before_mib=round(pending.memory_before["rss"], 1),
            peak_growth_mib=round(growth, 1),
            own_weights_in_host_mib=round(own, 1),
            transient_mib=round(growth - own, 1),
            peak_is_the_loads=pending.peak_reset,
        )
        logger.info(
            "rank %d: host RSS over the load of %s: peak +%.0f MiB (VmHWM; %.0f MiB before), of which %.0f MiB are "
            "this rank's weights in host memory, %.0f MiB transient; %.1f s",
            rank,
            pending.spec,
            growth,
            pending.memory_before["rss"],
            own,
            growth - own,
            record["seconds"],
        )
    return record
