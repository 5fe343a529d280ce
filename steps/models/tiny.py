"""The ``tiny`` model: a seeded, randomly initialised small Llama with the embedded tokenizer's vocabulary.

Fast enough for tests (~3.3M parameters, almost all of them the tied 49,152 x 64 embedding).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from steps.models.specs import ModelSource, ModelSpecError
from steps.models.tokenizers import load_tokenizer

if TYPE_CHECKING:  # heavy imports stay inside functions: each Metaflow step is a fresh process
    from transformers import PreTrainedModel

#: The tiny test model's shape; ``tiny:{json}`` specs override any of these (and any other LlamaConfig field).
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


@functools.lru_cache(maxsize=1)
def tiny_token_settings() -> dict[str, int]:
    """Vocabulary size and special ids of the embedded tokenizer (read once per process)."""
    tokenizer = load_tokenizer("tiny")
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_model(source: ModelSource, seed: int, attn_implementation: str | None) -> PreTrainedModel:
    """The tiny Llama for a ``tiny`` source, initialised from ``seed`` without moving the global torch RNG."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = {
        **tiny_token_settings(),
        **TINY_CONFIG,
        "attention_dropout": 0.0,
    }
    settings.update(dict(source.tiny_overrides))
    if attn_implementation is not None:
        settings["attn_implementation"] = attn_implementation
    try:
        config = LlamaConfig(**settings)
    except Exception as exc:  # TypeError/ValueError, or huggingface_hub's strict-dataclass validation error
        raise ModelSpecError(
            f"tiny model overrides {dict(source.tiny_overrides)} rejected by LlamaConfig: {exc}"
        ) from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
