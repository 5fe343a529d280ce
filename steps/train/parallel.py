"""How training spreads one model over the ranks of a torchrun job (one node or a gang): DDP, or FSDP2 (HSDP across
nodes). Every mode trains the root :class:`LogProbModel` (keys ``lm.<HF key>``, so checkpoints move between modes);
gradients are summed over ranks, since the loop divides each loss by the step's global denominator."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from steps.train import collectives
from steps.train.precision import Precision

logger = logging.getLogger(__name__)

ROOT_PREFIX = "lm."
MESH_DIMS = ("replicate", "shard")  # HSDP: replicas across nodes, shards within a node

#: How :func:`prepare` last spread a model in this process (the launcher reports it with the run summary).
_LAYOUT: dict[str, Any] = {}


class LogProbModel(torch.nn.Module):
    """Root around a Hugging Face causal LM; ``forward(batch)`` returns per-row log-prob sums and counts.

    The log-prob code calls the decoder body and the output projection separately (no full-vocabulary logits),
    so this module's forward *is* that computation: DDP's reducer hooks and FSDP2's pre-forward gather see it."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: Any, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        from steps.train.logprobs import sequence_logprobs

        return sequence_logprobs(self.lm, batch, chunk_rows)


ShardedCausalLM = LogProbModel  # the FSDP2 root's former name


def is_root(model: Any) -> bool:
    """A model whose forward takes a batch: the root itself, or DDP around it."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, (LogProbModel, DistributedDataParallel))


def is_sharded(model: Any) -> bool:
    """FSDP2: forwards and backwards run collectives, so every rank must run the same number of them."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_ddp(model: Any) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def root_of(model: Any) -> Any:
    """The :class:`LogProbModel` (inside DDP, or the FSDP2 root itself); None for a bare Hugging Face model."""
    if is_ddp(model):
        return model.module
    return model if isinstance(model, LogProbModel) else None


def unwrap(model: Any) -> Any:
    """The Hugging Face model inside (itself when it is one)."""
    root = root_of(model)
    return root.lm if root is not None else model


def device_of(model: Any) -> torch.device:
    """The device this rank computes on (a DTensor's device is its local shard's)."""
    return next(model.parameters()).device


def decoder_layers(lm: Any) -> list[torch.nn.Module]:
    """The repeated transformer blocks: ``model.layers`` for Llama-family models, else ``*DecoderLayer`` modules."""
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    body = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    layers = getattr(body, "layers", None)
    if layers is not None and len(layers):
        return list(layers)
    found = [m for m in lm.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not found:
        raise TypeError(f"{type(lm).__name__}: no decoder layers found to shard (parallelism: fsdp)")
    return found


def node_layout(world_size: int | None = None) -> tuple[int, int]:
    """(nodes, ranks per node) of this job: torchrun's ``LOCAL_WORLD_SIZE`` per node (every node starts the same
    number); without it (ranks started by hand) one node holds every rank."""
    world = collectives.world()[1] if world_size is None else world_size
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local < 1 or world % local:
        raise ValueError(f"world size {world} is not a multiple of LOCAL_WORLD_SIZE {local} (ranks per node)")
    return world // local, local


def fsdp_mesh_shape(nodes: int, per_node: int) -> tuple[int, ...]:
    """FSDP2's device mesh: 1-D over the ranks of one node; on a gang, 2-D (nodes, ranks per node) = HSDP,
    weights sharded within a node (fast links) and replicated across nodes (one all-reduce of shards per step)."""
    return (per_node,) if nodes == 1 else (nodes, per_node)


def last_layout() -> dict[str, Any]:
    """What :func:`prepare` built last in this process: parallelism, world size, nodes and the FSDP2 mesh."""
    return dict(_LAYOUT)


def prepare(lm: Any, parallelism: str, precision: Precision) -> Any:
    """The module to train: the bare root without a process group; DDP or FSDP2 around it with one (any size)."""
    root = LogProbModel(lm)
    _LAYOUT.clear()
    if not collectives.is_distributed():
        _LAYOUT.update(parallelism="none", world_size=1, nodes=1)
        return root
    nodes, per_node = node_layout()
    _LAYOUT.update(parallelism=parallelism, world_size=nodes * per_node, nodes=nodes)
    if parallelism == "fsdp":
        return _shard(root, precision, fsdp_mesh_shape(nodes, per_node))
    return _replicate(root)


def _replicate(root: LogProbModel) -> Any:
    """DDP: bucketed all-reduce overlapped with backward, summed by :func:`collectives.ddp_sum_hook`."""
    from torch.nn.parallel import DistributedDataParallel

    device = device_of(root)
    # rotary tables are computed, not trained: nothing to keep in sync per forward (the newer name first)
    buffers: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    ddp = DistributedDataParallel(
        root, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True, **buffers
    )
    ddp.register_comm_hook(device, collectives.ddp_sum_hook())
    logger.info("DDP over %d ranks (%s)", collectives.world()[1], device)
    return ddp


def _shard(root: LogProbModel, precision: Precision, shape: tuple[int, ...]) -> Any:
    """FSDP2 ``fully_shard`` per decoder layer plus the root (embeddings, final norm, lm_head): weights, gradients
    and AdamW state split over the mesh's shard dimension; compute in ``precision.compute``, gradients reduced in
    fp32 and summed over every rank (HSDP: reduce-scatter within a node, then all-reduce across nodes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    device = device_of(root)
    names = MESH_DIMS if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    _LAYOUT.update(mesh=list(shape), mesh_dims=list(names))
    policy = MixedPrecisionPolicy(
        param_dtype=precision.compute if precision.mixed else None, reduce_dtype=torch.float32
    )
    layers = decoder_layers(root.lm)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    sharded = fully_shard(root, mesh=mesh, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    logger.info(
        "FSDP2%s: %d decoder layers + root over %d ranks, mesh %s (%s, %s)",
        " (HSDP)" if len(shape) == 2 else "",
        len(layers),
        mesh.size(),
        dict(zip(names, shape)),
        device,
        precision.describe(),
    )
    return sharded


def compute_context(model: Any, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """Autocast for single device and DDP; nothing under FSDP2 (its policy casts the gathered weights)."""
    return contextlib.nullcontext() if is_sharded(model) else precision.autocast()


@contextlib.contextmanager
def gradient_sync(model: Any, enabled: bool) -> Iterator[None]:
    """Reduce gradients in this backward (a step's last micro-batch) or accumulate locally (DDP ``no_sync``)."""
    if is_ddp(model) and not enabled:
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    yield


def full_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """Unsharded CPU weights keyed like the Hugging Face model's own state dict, gathered from every rank (a
    collective; rank 0 holds them); None for a model that is not sharded (it saves its own parameters)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state: dict[str, torch.Tensor] = {k[len(ROOT_PREFIX) :]: v for k, v in full.items()}  # type: ignore[misc]
    tied = tied_embedding_keys(model.lm)
    if tied is not None:  # saved once, under the input embedding's name, as save_pretrained does
        state.pop(tied[0], None)
    return state


def tied_embedding_keys(lm: Any) -> tuple[str, str] | None:
    """(output embedding weight key, input embedding weight key) when the model ties them, else None."""
    if not getattr(lm.config, "tie_word_embeddings", False):
        return None
    names = {id(m): name for name, m in lm.named_modules()}
    return (names[id(lm.get_output_embeddings())] + ".weight", names[id(lm.get_input_embeddings())] + ".weight")
