"""``load_model``: any spec to a model on a device in a dtype, with every dropout probability set to zero.

The recipe trains without dropout; dropout in the policy but not the reference inflates the initial DPO loss.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from steps.models.embedded import ensure_embedded_model
from steps.models.gguf_files import load_gguf_model
from steps.models.specs import DEFAULT_MODEL, hub_errors, resolve_model_spec
from steps.models.tiny import tiny_model

if TYPE_CHECKING:  # heavy imports stay inside functions: each Metaflow step is a fresh process
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(set(_DTYPES.values()))}")
    return getattr(torch, name)


def resolve_dtype(dtype: str, device: str | torch.device) -> str:
    """``auto`` -> ``bfloat16`` on a CUDA device that supports it, else ``float32``; other names unchanged."""
    if str(dtype).lower() != "auto":
        return str(dtype)
    import torch

    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def zero_dropout_config(config: Any) -> list[str]:
    """Set every dropout probability in a config (and its sub-configs) to 0. Returns what was changed."""
    changed = []
    for key, value in list(vars(config).items()):
        lowered = key.lower()
        if ("dropout" in lowered or "pdrop" in lowered) and isinstance(value, float) and value != 0.0:
            setattr(config, key, 0.0)
            changed.append(f"{key}={value}")
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # nested sub-config
            changed += [f"{key}.{c}" for c in zero_dropout_config(value)]
    return changed


def zero_dropout_modules(model: torch.nn.Module) -> None:
    """Belt and braces for modules that copied a probability at construction (nn.Dropout, attention_dropout)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "resid_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The model named by ``spec`` on ``device`` in ``dtype`` (``auto``: :func:`resolve_dtype`), dropout 0.

    Returned in eval mode (as ``from_pretrained`` does); with dropout at 0 train/eval mode computes the same,
    so trainers may call ``.train()`` freely. ``seed`` only matters for ``tiny`` (its random init); the
    global torch RNG is left as it was.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype_ = torch_dtype(dtype if not isinstance(dtype, str) else resolve_dtype(dtype, device))
    source = resolve_model_spec(spec)
    started = time.monotonic()
    if source.kind == "tiny":
        model = tiny_model(source, seed, attn_implementation)
    elif source.kind == "gguf":
        model = load_gguf_model(source.path, config_overrides=zero_dropout_config)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    else:
        location = str(ensure_embedded_model(source.location)) if source.kind == "embedded" else source.location
        with hub_errors(spec, source.kind == "hub"):
            config = AutoConfig.from_pretrained(location)
            zero_dropout_config(config)
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=dtype_, **kwargs)
    zero_dropout_config(model.config)
    zero_dropout_modules(model)
    moved: Any = model  # PreTrainedModel.to is a decorated method mypy cannot call
    model = moved.to(device=device, dtype=dtype_)
    summary = model_summary(model)
    logger.info(
        "loaded %s (%s): %s parameters, %s on %s in %.1f s",
        spec,
        source.kind,
        f"{summary['parameters']:,}",
        summary["dtype"],
        summary["device"],
        time.monotonic() - started,
    )
    return model


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Small facts for logs and run metadata: parameter counts (tied weights once), dtype, device, type."""
    params = list(model.parameters())  # parameters() yields a shared (tied) tensor once
    first = params[0] if params else None
    config = getattr(model, "config", None)
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "model_type": getattr(config, "model_type", type(model).__name__),
        "vocab_size": getattr(config, "vocab_size", None),
    }
