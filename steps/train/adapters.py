"""LoRA and QLoRA for the training steps: attach adapters (peft), check that 4-bit loading can run here, prepare a
4-bit base, and hand an adapter on as a directory that ``steps.models.load_model`` loads over its base."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from steps.config import LoraConfig, TrainConfig
from steps.io import atomic_write_text
from steps.models.load import FourBit, adapter_base, four_bit_problem
from steps.models.specs import resolve_model_spec
from steps.train import collectives, parallel
from steps.train.checkpoints import COMPLETE
from steps.train.precision import Precision

logger = logging.getLogger(__name__)


def is_peft(model: Any) -> bool:
    """A peft model (adapters attached)."""
    return hasattr(model, "peft_config")


def check_four_bit(section: str, lora: LoraConfig, device: Any) -> None:
    """Fail at the start of a training step when ``<section>.lora.load_in_4bit`` cannot run on this machine.

    Not at config load: configs are checked on machines (laptops, schedulers) that never hold the GPU."""
    if not (lora.enabled and lora.load_in_4bit):
        return
    problem = four_bit_problem(device)
    if problem is not None:
        from steps.models.load import QuantizationUnavailableError

        key = f"{section}.lora.load_in_4bit"
        raise QuantizationUnavailableError(
            f"{key}: QLoRA needs a CUDA GPU and bitsandbytes: {problem}. Fix: run this step on a CUDA GPU with "
            f"bitsandbytes installed (pip install bitsandbytes), or set {key}: false to train LoRA on the "
            "full-precision base"
        )


def four_bit_of(lora: LoraConfig | None, precision: Precision) -> FourBit | None:
    """How the base is loaded under QLoRA: linear layers in 4 bits, computing in the run's compute dtype."""
    if lora is None or not (lora.enabled and lora.load_in_4bit):
        return None
    return FourBit(quant_type=lora.bnb_4bit_quant_type, compute_dtype=precision.compute)


def prepare_four_bit(model: Any, gradient_checkpointing: bool) -> Any:
    """peft's preparation of a 4-bit base for training: frozen, norms and embeddings in fp32, checkpointing."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # as load_for_training does without 4 bits
    )
    if gradient_checkpointing:
        model.config.use_cache = False
    keep_parameters_only(model)
    return model


def keep_parameters_only(model: Any) -> None:
    """``model.state_dict()`` without keys that name no parameter or buffer.

    bitsandbytes adds each 4-bit layer's quantization statistics under parameter-like names (``...weight.absmax``,
    ``...weight.quant_state.bitsandbytes__nf4``); torch.distributed.checkpoint resolves every key as an attribute
    path and fails on them (AttributeError) when the trainer checkpoints. They are the frozen base's, not trainer
    state, and peft saves adapters from the adapter keys alone."""

    def drop_extras(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        names = {prefix + n for n, _ in module.named_parameters(remove_duplicate=False)}
        names |= {prefix + n for n, _ in module.named_buffers(remove_duplicate=False)}
        for key in [k for k in state_dict if k.startswith(prefix) and k not in names]:
            if not key.endswith("_extra_state"):
                del state_dict[key]

    model.register_state_dict_post_hook(drop_extras)


def apply_lora(model: Any, train_cfg: TrainConfig) -> Any:
    """``model`` with trainable LoRA adapters (``train_cfg.lora``); unchanged when LoRA is off.

    A model that already carries an adapter (an adapter directory over a 4-bit base, which cannot be merged) keeps
    training that adapter: its r, alpha and target modules are the adapter's own."""
    if not train_cfg.lora.enabled:
        return model
    try:
        import peft
    except ImportError as exc:
        raise ImportError("lora.enabled needs the 'peft' package: pip install peft") from exc
    if is_peft(model):
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        for config in model.peft_config.values():
            config.inference_mode = False
        logger.warning(
            "the init model is an adapter over a base that cannot be merged: training its adapter further "
            "(its own r/alpha/target_modules; the lora section's are not used)"
        )
        return model
    lora = train_cfg.lora
    torch.manual_seed(train_cfg.seed)  # adapter init is random: make it a function of the config seed
    pc = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, pc)


def reference_is_policy_base(lora: LoraConfig, init_spec: str, ref_spec: str | None, policy: Any) -> bool:
    """A live reference can be the policy with its adapters disabled: fresh adapters over the reference itself.

    ``policy`` is the loaded init model before :func:`apply_lora` (one that already carries an adapter is not its
    own reference once the adapters are off)."""
    return lora.enabled and ref_spec is not None and ref_spec == init_spec and not is_peft(policy)


def pointer_spec(spec: str) -> str:
    """The spec an adapter directory records for its base: local paths made absolute, anything else as given."""
    source = resolve_model_spec(spec)
    return source.location if source.kind in ("local", "gguf") else spec.strip()


def hand_on_base(init_spec: str, policy: Any) -> str:
    """The base a handed-on adapter points at: the init model, or (an adapter trained further) the init's base."""
    return pointer_spec(adapter_base(init_spec) if is_peft(policy) else init_spec)


def save_adapter_dir(model: Any, tokenizer: Any, path: Path, base_spec: str) -> Path:
    """Write the adapter, the base's config, the tokenizer and the base's spec as one directory, atomically.

    The spec sits where peft puts it (``base_model_name_or_path`` in adapter_config.json); config.json is the
    base's architecture (without its quantization settings: the adapter loads over the full-precision base too)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_spec
    # adapter weights only (no whole embedding matrices: LoRA leaves the vocabulary as it is)
    model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
    base_config = copy.deepcopy(model.get_base_model().config)
    if hasattr(base_config, "quantization_config"):
        del base_config.quantization_config
    base_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / COMPLETE, json.dumps({"time": time.time(), "adapter_over": base_spec}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def export_adapter(model: Any, tokenizer: Any, path: Path, base_spec: str) -> Path:
    """The trained adapter as the step's model directory (``lora.hand_on: adapter``); rank 0 writes, all wait."""
    if collectives.world()[0] == 0:
        save_adapter_dir(parallel.unwrap(model), tokenizer, path, base_spec)
        logger.info("adapter handed on: %s (over %s)", path, base_spec)
    collectives.barrier(parallel.device_of(model))
    return Path(path)
