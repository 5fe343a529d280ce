"""``load_model``: any spec to a model on a device in a dtype (or its linear layers in 4 bits), dropout zero.

Dropout in the policy but not the reference inflates the initial DPO loss; adapter directories load over their base.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.models.embedded import ensure_embedded_model
from steps.models.gguf_files import load_gguf_model
from steps.models.random_init import random_model
from steps.models.specs import DEFAULT_MODEL, ModelSpecError, hub_errors, resolve_model_spec
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

#: What marks a directory as a LoRA adapter (peft's file); its ``base_model_name_or_path`` is the base's spec.
ADAPTER_CONFIG = "adapter_config.json"
#: An adapter over an adapter directory over ... : more levels than this is a loop.
MAX_ADAPTER_DEPTH = 8


class QuantizationUnavailableError(RuntimeError):
    """4-bit loading was asked for where it cannot run (no CUDA GPU, no bitsandbytes, a model built in memory)."""


@dataclass(frozen=True)
class FourBit:
    """Load the base's linear layers in 4 bits through bitsandbytes (QLoRA); they compute in ``compute_dtype``."""

    quant_type: str = "nf4"  # "nf4" or "fp4"
    compute_dtype: Any = "bfloat16"  # a dtype name or a torch.dtype


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


def is_adapter_dir(path: str | Path) -> bool:
    """A directory holding a LoRA adapter (``adapter_config.json``) rather than full weights."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The model spec an adapter directory was trained on (``base_model_name_or_path`` in its adapter_config.json)."""
    config_path = Path(path).expanduser() / ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"{config_path}: cannot read the adapter's config ({exc})") from exc
    if not isinstance(base, str) or not base.strip():
        raise ModelSpecError(
            f"{config_path}: base_model_name_or_path is empty, so the adapter's base model is unknown; set it to the "
            "spec of the model the adapter was trained on (a Hub id, a directory, embedded:<name>, tiny)"
        )
    return base


def four_bit_problem(device: str | torch.device) -> str | None:
    """Why 4-bit loading cannot run on ``device`` here (None: it can): bitsandbytes 4-bit needs a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return "4-bit loading (bitsandbytes) needs a CUDA GPU and this machine has none"
    if str(device) != "auto" and torch.device(device).type != "cuda":
        return f"4-bit loading (bitsandbytes) needs a CUDA GPU; the model is placed on {device}"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "4-bit loading needs the bitsandbytes package, which is not installed (pip install bitsandbytes)"
    return None


def four_bit_kwargs(four_bit: FourBit, device: str | torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments that quantize the linear layers on ``device`` (the output layer stays whole)."""
    import torch
    from transformers import BitsAndBytesConfig

    if four_bit.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"4-bit quant_type {four_bit.quant_type!r}; use nf4 or fp4")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=four_bit.quant_type,
        bnb_4bit_compute_dtype=torch_dtype(four_bit.compute_dtype),
    )
    target = torch.device("cuda" if str(device) == "auto" else device)
    return {"quantization_config": config, "device_map": {"": target}}


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str | None = None,
    four_bit: FourBit | None = None,
    merge_adapter: bool | None = None,
) -> PreTrainedModel:
    """The model named by ``spec`` on ``device`` in ``dtype`` (``auto``: :func:`resolve_dtype`), dropout 0.

    Returned in eval mode (as ``from_pretrained`` does); with dropout at 0 train/eval mode computes the same,
    so trainers may call ``.train()`` freely. ``seed`` only matters for ``tiny``/``random:`` (random init); the
    global torch RNG is left as it was. ``four_bit``: the linear layers in 4 bits (CUDA and bitsandbytes only;
    the other weights in ``dtype``). An adapter directory loads its base the same way, then the adapter; it is
    merged into a plain model unless ``merge_adapter`` is false or the base is in 4 bits (a peft model then).
    """
    if four_bit is not None:
        problem = four_bit_problem(device)
        if problem is not None:
            raise QuantizationUnavailableError(f"cannot load {spec!r} in 4 bits: {problem}")
    resolved = torch_dtype(dtype if not isinstance(dtype, str) else resolve_dtype(dtype, device))
    return _load(spec, _LoadRequest(resolved, device, seed, attn_implementation, four_bit, merge_adapter), depth=0)


@dataclass(frozen=True)
class _LoadRequest:
    """How load_model was asked to load (an adapter's base is loaded the same way)."""

    dtype: torch.dtype
    device: str | torch.device
    seed: int
    attn_implementation: str | None
    four_bit: FourBit | None
    merge_adapter: bool | None


def _load(spec: str, request: _LoadRequest, depth: int) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype_, device, four_bit = request.dtype, request.device, request.four_bit
    attn_implementation = request.attn_implementation
    source = resolve_model_spec(spec)
    if source.kind == "local" and is_adapter_dir(source.path):
        return _load_adapter(source.path, request, depth)
    started = time.monotonic()
    if four_bit is not None and source.kind in ("tiny", "random", "gguf"):
        raise QuantizationUnavailableError(
            f"cannot load {spec!r} in 4 bits: a {source.kind} model is built in memory, and bitsandbytes quantizes "
            "while from_pretrained loads; save it with save_pretrained and pass that directory"
        )
    if source.kind == "tiny":
        model = tiny_model(source, request.seed, attn_implementation)
    elif source.kind == "random":
        model = random_model(source, request.seed, attn_implementation)
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
            if four_bit is not None:
                kwargs.update(four_bit_kwargs(four_bit, device))
            model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=dtype_, **kwargs)
    zero_dropout_config(model.config)
    zero_dropout_modules(model)
    if four_bit is None:  # a quantized model is placed by from_pretrained and cannot change dtype
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


def _load_adapter(path: Path, request: _LoadRequest, depth: int) -> Any:
    """The base an adapter directory points at (loaded as asked), then the adapter: merged, or a peft model."""
    dtype, device, four_bit, merge_adapter = request.dtype, request.device, request.four_bit, request.merge_adapter
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ImportError(f"{path} is a LoRA adapter directory: loading it needs peft (pip install peft)") from exc
    if depth >= MAX_ADAPTER_DEPTH:
        raise ModelSpecError(f"{path}: more than {MAX_ADAPTER_DEPTH} adapters over adapters; is there a loop?")
    merge = four_bit is None if merge_adapter is None else merge_adapter
    if merge and four_bit is not None:
        raise ValueError(f"{path}: an adapter cannot be merged into a 4-bit base; pass merge_adapter=False")
    base_spec = adapter_base(path)
    base_source = resolve_model_spec(base_spec)
    if four_bit is not None and base_source.kind == "local" and is_adapter_dir(base_source.path):
        raise QuantizationUnavailableError(
            f"{path} is an adapter over another adapter ({base_spec}), which cannot be merged into a 4-bit base; "
            "load it without 4 bits, or train from a merged model"
        )
    started = time.monotonic()
    # an adapter over an adapter directory: that one is merged into its own base first
    base = _load(base_spec, dataclasses.replace(request, merge_adapter=None), depth + 1)
    model: Any = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    zero_dropout_modules(model)  # lora_dropout
    if merge:
        model = model.merge_and_unload().to(device=device, dtype=dtype)
        # the merged model is not its base: nothing may take the base's path for it (vLLM, model cards)
        model.name_or_path = model.config._name_or_path = str(path)
    else:
        model = model.to(device=device) if four_bit is None else model
    logger.info(
        "adapter %s applied over %s (%s) in %.1f s",
        path,
        base_spec,
        "merged" if merge else "kept separate",
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


@dataclass
class Blueprint:
    """What another process needs to build the same model without reading its weights: the class, the configs and
    the buffers (rotary tables and the like are computed, not stored, so they travel as they are)."""

    cls: type
    config: Any
    generation_config: Any
    buffers: dict[str, torch.Tensor]
    dtype: torch.dtype


def blueprint_of(model: torch.nn.Module) -> Blueprint:
    """The blueprint of a loaded model (its buffers copied to the CPU)."""
    param = next(model.parameters())
    return Blueprint(
        cls=type(model),
        config=copy.deepcopy(getattr(model, "config", None)),
        generation_config=copy.deepcopy(getattr(model, "generation_config", None)),
        buffers={name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()},
        dtype=param.dtype,
    )


def build_empty(blueprint: Blueprint) -> Any:
    """The blueprint's model with every parameter on the meta device (no memory, no init), tied embeddings tied,
    dropout 0, eval mode; buffers real, as computed at construction (callers restore ``blueprint.buffers`` once
    the parameters are materialised). Weights arrive later (torch.distributed.checkpoint's set_model_state_dict)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = blueprint.cls(blueprint.config)
    model = model.to(dtype=blueprint.dtype)
    if blueprint.generation_config is not None:
        model.generation_config = copy.deepcopy(blueprint.generation_config)
    model.tie_weights()  # init_empty_weights builds the output embedding apart from the input one
    zero_dropout_config(model.config)
    zero_dropout_modules(model)
    return model.eval()


def restore_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Put ``buffers`` (name -> tensor, as :func:`blueprint_of` copied them) back on ``model``'s modules, on the
    device of the buffer they replace (``to_empty`` leaves buffers uninitialised)."""
    for name, value in buffers.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = owner._buffers.get(attr)
        if current is None:
            raise KeyError(f"{type(model).__name__}: no buffer {name!r} to restore (the blueprint is another model's)")
        owner._buffers[attr] = value.to(device=current.device, copy=True)
