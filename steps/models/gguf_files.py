"""GGUF files as plain dense fp32 models (and their tokenizers), through transformers' public API only.

``from_pretrained(dir, gguf_file=...)`` dequantises but marks the model quantized; we lift that mark.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay inside functions: each Metaflow step is a fresh process
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class GgufLoadError(ValueError):
    """A GGUF file cannot become a plain dense model here (tensors do not fit, accelerate missing, packed weights)."""


def load_gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) stored in a GGUF file's metadata."""
    from transformers import AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    logger.info(
        "read tokenizer from %s (%d tokens) in %.1f s",
        gguf,
        len(tokenizer),
        time.monotonic() - started,
    )
    return tokenizer


def load_gguf_model(gguf: Path, config_overrides: Callable[[Any], object] | None = None) -> PreTrainedModel:
    """A plain, dense fp32 model from a GGUF file, not marked as quantized, so it can be saved and trained.

    transformers 5 loads GGUF through a quantizer that dequantises the weights (we ask for that explicitly,
    so installed GGUF kernels cannot keep them packed) and then refuses ``save_pretrained`` and training;
    ``model.hf_quantizer.remove_quantization_config(model)`` lifts that (FIELD_NOTES). ``config_overrides``
    edits the config before the model is built (e.g. zeroing dropout). The global torch RNG is left as it was.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is None:
        raise GgufLoadError(
            f"loading {gguf} needs the 'accelerate' package (transformers refuses GGUF files without it); "
            f"fix: pip install accelerate"
        )
    started = time.monotonic()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if config_overrides is not None:
        config_overrides(config)
    kwargs: dict[str, Any] = {}
    gguf_config = getattr(transformers, "GgufConfig", None)  # absent before transformers 5
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    with torch.random.fork_rng(devices=[]):  # weights the file lacks get a random init: keep the caller's RNG
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            config=config,
            dtype=torch.float32,
            output_loading_info=True,
            **kwargs,
        )
    model, info = loaded
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:  # from_pretrained would otherwise fill the gaps with random weights
        raise GgufLoadError(
            f"{gguf}: GGUF tensors do not match {type(model).__name__} (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {mismatched[:5]})"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if packed or getattr(model, "is_quantized", False):
        raise GgufLoadError(
            f"{gguf}: transformers {transformers.__version__} left weights that are not dense float32 "
            f"({', '.join(packed) or 'still marked quantized'}); use a transformers version that dequantises GGUF"
        )
    logger.info(
        "read %s (%.1f MiB, %s, %s parameters) in %.1f s",
        gguf,
        gguf.stat().st_size / 2**20,
        type(model).__name__,
        f"{sum(p.numel() for p in model.parameters()):,}",
        time.monotonic() - started,
    )
    return model
