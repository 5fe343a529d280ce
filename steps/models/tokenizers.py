"""Tokenizers for model specs, and the pad-token policy: pad with a token that is never the end-of-turn token.

Padding *side* stays the caller's job: right for training batches, left for batched generation.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from steps.chat import end_of_turn_token_id, has_token
from steps.models.embedded import ensure_embedded_model
from steps.models.gguf_files import load_gguf_tokenizer
from steps.models.random_init import random_tokenizer_dir
from steps.models.specs import (
    DEFAULT_EMBEDDED,
    DEFAULT_MODEL,
    ModelSpecError,
    hub_errors,
    resolve_model_spec,
)

if TYPE_CHECKING:  # heavy imports stay inside functions: each Metaflow step is a fresh process
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Tried in order after the tokenizer's own pad, eos and unk tokens.
PAD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token that is NOT the end-of-turn token.

    SmolLM2 ships pad == eos == ``<|im_end|>``, its end-of-turn token. Padding with the end-of-turn id is a
    classic trap: code that masks labels with ``ids == pad_token_id`` then also masks the end-of-turn target
    and the model never learns to stop. So we take the first of (current pad, eos, unk, a few well-known
    document-end/pad tokens) that exists and differs from end-of-turn; ``<|endoftext|>`` (id 0) for SmolLM2.
    Masks must still come from lengths / attention masks, never from pad ids.
    """
    try:
        eot = end_of_turn_token_id(tokenizer)
    except ValueError:
        eot = None
    candidates = [
        tokenizer.pad_token,
        tokenizer.eos_token,
        tokenizer.unk_token,
        *PAD_CANDIDATES,
    ]
    for token in candidates:
        if has_token(tokenizer, token) and tokenizer.convert_tokens_to_ids(token) != eot:
            if token != tokenizer.pad_token:
                logger.info(
                    "pad token: %r -> %r (kept distinct from the end-of-turn token)",
                    tokenizer.pad_token,
                    token,
                )
                tokenizer.pad_token = token
            return
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token
        if fallback is None:
            raise ModelSpecError("tokenizer has neither a pad nor an eos token; cannot pad batches")
        logger.warning("no pad token distinct from end-of-turn; padding with %r", fallback)
        tokenizer.pad_token = fallback


def _from_pretrained_tokenizer(location: str, spec: str, is_hub: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    with hub_errors(spec, is_hub):
        return AutoTokenizer.from_pretrained(location)


def load_tokenizer(spec: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The tokenizer of ``spec`` (``tiny`` uses the embedded default's; ``random:<dir>`` the one its config names),
    with a usable pad token."""
    source = resolve_model_spec(spec)
    started = time.monotonic()
    if source.kind in ("embedded", "tiny"):
        name = source.location if source.kind == "embedded" else DEFAULT_EMBEDDED
        tokenizer = _from_pretrained_tokenizer(str(ensure_embedded_model(name)), spec, is_hub=False)
    elif source.kind == "gguf":
        tokenizer = load_gguf_tokenizer(source.path)
    elif source.kind == "random":
        tokenizer = _from_pretrained_tokenizer(str(random_tokenizer_dir(source)), spec, is_hub=False)
    else:
        tokenizer = _from_pretrained_tokenizer(source.location, spec, is_hub=source.kind == "hub")
    ensure_pad_token(tokenizer)
    logger.info(
        "tokenizer %s: %d tokens, loaded in %.1f s",
        spec,
        len(tokenizer),
        time.monotonic() - started,
    )
    return tokenizer
