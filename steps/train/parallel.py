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

from steps.train import collectives, torch_floor, weights
from steps.train.precision import Precision

logger = logging.getLogger(__name__)

ROOT_PREFIX = "lm."
MESH_DIMS = ("replicate", "shard")  # HSDP: replicas across nodes, shards within a node

#: How :func:`prepare` last spread a model in this process (the launcher reports it with the run summary).
_LAYOUT: dict[str, Any] = {}
#: Every rank's host-memory record of the last load from rank 0 (:func:`steps.train.weights.memory_record`) in this
#: process, of the policy and of a reference ("policy", "reference"); the launcher reports it with the run summary.
_LOAD_MEMORY: dict[str, list[dict]] = {}


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


def last_load_memory() -> dict[str, list[dict]]:
    """Per-rank host RSS over the last rank-0 loads of the policy and of a reference (see :data:`_LOAD_MEMORY`)."""
    return {k: list(v) for k, v in _LOAD_MEMORY.items()}


def rank_device() -> torch.device:
    """This rank's compute device: its GPU (the launcher made it current from LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def prepare(lm: Any, parallelism: str, precision: Precision, pending: weights.PendingWeights | None = None) -> Any:
    """The module to train: the bare root without a process group; DDP or FSDP2 around it with one (any size).

    ``pending``: ``lm`` was built on the meta device (:func:`steps.train.weights.read_on_rank0`); it is spread first,
    then materialised on the rank's device and given rank 0's weights."""
    root = LogProbModel(lm)
    _LAYOUT.clear()
    _LOAD_MEMORY.clear()
    if not collectives.is_distributed():
        if pending is not None:
            raise RuntimeError("weights pending from rank 0 need a process group")
        _LAYOUT.update(parallelism="none", world_size=1, nodes=1)
        return root
    torch_floor.check_torch()
    nodes, per_node = node_layout()
    _LAYOUT.update(parallelism=parallelism, world_size=nodes * per_node, nodes=nodes)
    spread = _spread(root, parallelism, precision, pending, "policy")
    return spread if parallelism == "fsdp" else _replicate(spread)


def prepare_frozen(
    lm: Any, parallelism: str, precision: Precision, pending: weights.PendingWeights | None = None
) -> Any:
    """A reference model laid out like the policy :func:`prepare` gives: the same root, under FSDP2 sharded over the
    same mesh with the same mixed-precision policy (so it computes exactly as the policy does), without gradients
    and without DDP (nothing to reduce); the bare root without a process group."""
    lm.requires_grad_(False).eval()
    root = LogProbModel(lm).eval()
    if not collectives.is_distributed():
        if pending is not None:
            raise RuntimeError("weights pending from rank 0 need a process group")
        return root
    return _spread(root, parallelism, precision, pending, "reference")


def _spread(
    root: LogProbModel, parallelism: str, precision: Precision, pending: weights.PendingWeights | None, record_as: str
) -> Any:
    """FSDP2-shard ``root`` (``parallelism: fsdp``), then give it its pending weights (if any); every rank's host
    memory record of that load goes into :func:`last_load_memory` under ``record_as`` (``policy``: trainable)."""
    device = pending.device if pending is not None else device_of(root)
    spread: Any = root
    if parallelism == "fsdp":
        spread = _shard(root, precision, fsdp_mesh_shape(*node_layout()), device, frozen=record_as != "policy")
    if pending is not None:
        record = weights.materialise(spread, root.lm, pending, ROOT_PREFIX, sharded=parallelism == "fsdp")
        _LOAD_MEMORY[record_as] = collectives.all_gather_object(record, device, "load memory records")
    return spread


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


def _shard(
    root: LogProbModel, precision: Precision, shape: tuple[int, ...], device: torch.device, frozen: bool = False
) -> Any:
    """FSDP2 ``fully_shard`` per decoder layer plus the root (embeddings, final norm, lm_head): weights, gradients
    and AdamW state split over the mesh's shard dimension; compute in ``precision.compute``, gradients reduced in
    fp32 and summed over every rank (HSDP: reduce-scatter within a node, then all-reduce across nodes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    names = MESH_DIMS if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    _LAYOUT.update(mesh=list(shape), mesh_dims=list(names))
    policy = MixedPrecisionPolicy(
        param_dtype=precision.compute if precision.mixed else None, reduce_dtype=torch.float32
    )
    layers = decoder_layers(root.lm)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # the root's own weights stay gathered after a forward until the backward, except in a frozen model (none comes)
    sharded = fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=True if frozen else None)
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


def reshard(model: Any) -> None:
    """Free the weights FSDP2 gathered for no-grad forwards. The root keeps its own gathered after a forward, for the
    backward that follows in training; after scoring no backward follows, and until resharded they stay in memory and
    ``model.parameters()`` yields the gathered tensors instead of the sharded ones (an optimizer built then would
    hold the wrong tensors). Nothing to do for other layouts."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules() if is_sharded(model) else ():
        if isinstance(module, FSDPModule):
            module.reshard()


def compute_context(model: Any, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """Autocast for single device and DDP; nothing under FSDP2 (its policy casts the gathered weights)."""
    return contextlib.nullcontext() if is_sharded(model) else precision.autocast()


@contextlib.contextmanager
def gradient_sync(model: Any, enabled: bool) -> Iterator[None]:
    """``enabled`` on a step's last micro-batch. DDP accumulates locally before it (``no_sync``). FSDP2 reduce-scatters
    every micro-batch, so a rank only ever keeps its shard of the gradients (never a whole unsharded fp32 gradient);
    under HSDP only the all-reduce across nodes waits for the last micro-batch (a 1-D mesh has none to skip)."""
    if is_ddp(model) and not enabled:
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_all_reduce(enabled)
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
