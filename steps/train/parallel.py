"""How training spreads one model over the ranks of a torchrun job.

``ddp`` (the default): every rank holds the whole model and AdamW state; the loop sums gradients
with one flat all-reduce per optimizer step.

``fsdp``: FSDP2 ``fully_shard``. Each decoder layer is one unit and a root unit holds the rest
(embeddings, final norm, ``lm_head``, tied or not), so a rank keeps 1/N of the weights, gradients
and AdamW state: for models that do not fit one GPU. The log-prob code calls the decoder body and the
output projection separately (it never builds full-vocabulary logits), so the root is
:class:`ShardedCausalLM`, a module whose forward *is* that computation: its pre-forward gathers the
root parameters, and its backward reduces their gradients like any other unit.

Every rank must run the same collectives in the same order, so callers of :func:`full_state_dict`,
forward passes and optimizer steps are made on all ranks.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ROOT_PREFIX = "lm."


class ShardedCausalLM(torch.nn.Module):
    """FSDP root around a Hugging Face causal LM; ``forward(batch)`` returns per-row log-prob sums and counts."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch, chunk_rows: int | None = None):
        from steps.train.logprobs import sequence_logprobs

        return sequence_logprobs(self.lm, batch, chunk_rows)


def is_sharded(model) -> bool:
    return isinstance(model, ShardedCausalLM)


def unwrap(model):
    """The Hugging Face model inside (itself when not sharded)."""
    return model.lm if is_sharded(model) else model


def decoder_layers(lm) -> list[torch.nn.Module]:
    """The repeated transformer blocks: ``model.layers`` for Llama-family models, else ``*DecoderLayer`` modules."""
    body = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    layers = getattr(body, "layers", None)
    if layers is not None and len(layers):
        return list(layers)
    found = [m for m in lm.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not found:
        raise TypeError(f"{type(lm).__name__}: no decoder layers found to shard (parallelism: fsdp)")
    return found


def shard(lm, world_size: int) -> ShardedCausalLM:
    """Apply FSDP2 to ``lm`` in place over all ranks; returns the root to train (its parameters are DTensors).

    Gradients are summed across ranks, not averaged: the loop already divides each micro-batch's loss
    by the whole optimizer step's denominator, so the sum is the single-process gradient.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device_type = next(lm.parameters()).device.type
    mesh = init_device_mesh(device_type, (world_size,))
    layers = decoder_layers(lm)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    root = fully_shard(ShardedCausalLM(lm), mesh=mesh)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    log.info("FSDP2: %d decoder layers + root sharded over %d ranks (%s)", len(layers), world_size, device_type)
    return root


def set_gradient_sync(model, enabled: bool) -> None:
    """Reduce gradients on this backward (the last micro-batch of a step) or keep accumulating locally."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """Unsharded CPU weights keyed like the Hugging Face model's own state dict, gathered from every rank
    (a collective); None for a model that is not sharded (it saves its own parameters)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {k[len(ROOT_PREFIX) :]: v for k, v in state.items()}
    tied = _tied_embedding_keys(model.lm)
    if tied is not None:  # saved once, under the input embedding's name, as save_pretrained does
        state.pop(tied[0], None)
    return state


def _tied_embedding_keys(lm) -> tuple[str, str] | None:
    """(output embedding weight key, input embedding weight key) when the model ties them, else None."""
    if not getattr(lm.config, "tie_word_embeddings", False):
        return None
    names = {id(m): name for name, m in lm.named_modules()}
    return (names[id(lm.get_output_embeddings())] + ".weight", names[id(lm.get_input_embeddings())] + ".weight")


def full_optimizer_state(model, optimizer) -> dict | None:
    """AdamW state keyed by parameter name, unsharded on CPU (a collective); None when not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, weights: dict[str, torch.Tensor], optimizer_state: dict | None) -> None:
    """Put unsharded weights (and optimizer state) back into a sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    lm = unwrap(model)
    expected = lm.state_dict().keys()
    weights = dict(weights)
    tied = _tied_embedding_keys(lm)
    if tied is not None and tied[0] not in weights and tied[1] in weights:
        weights[tied[0]] = weights[tied[1]]
    missing = [k for k in expected if k not in weights]
    if missing:
        raise RuntimeError(f"checkpoint does not match the model (missing {missing[:3]})")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, {ROOT_PREFIX + k: weights[k] for k in expected}, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
