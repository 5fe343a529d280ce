"""Next-token log-probabilities of a causal LM for many prompts that share a prefix: the prefix runs once and
its KV cache is reused for every prompt that starts with it."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class PrefixCachedScorer:
    """Log-softmax of the next token after each prompt; prompts that start with ``prefix_ids`` only run their
    remainder, on a copy of the prefix's KV cache. ``forward_passes`` counts model calls."""

    def __init__(self, model: PreTrainedModel, prefix_ids: Sequence[int]) -> None:
        self.model = model
        self.prefix_ids = list(prefix_ids)
        self.forward_passes = 0
        parameters = inspect.signature(model.forward).parameters
        self._keeps_last_logits = "logits_to_keep" in parameters
        # transformers 5 calls the KV cache ``cache`` (argument and output); earlier versions ``past_key_values``
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        self._prefix_cache: Any = None

    def next_token_logprobs(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Float32 log-probabilities over the vocabulary of the token after ``prompt_ids``."""
        import torch

        prompt_ids, prefix = list(prompt_ids), self.prefix_ids
        with torch.inference_mode():
            if self._prefix_cache is None and prefix:
                self._prefix_cache = getattr(self._forward(prefix, keep_cache=True), self._cache_name)
            if prefix and len(prompt_ids) > len(prefix) and prompt_ids[: len(prefix)] == prefix:
                out = self._forward(prompt_ids[len(prefix) :], past=copy.deepcopy(self._prefix_cache))
            else:
                logger.debug("prompt does not start with the cached prefix; full forward pass")
                out = self._forward(prompt_ids)
            return torch.log_softmax(out.logits[0, -1].float(), dim=-1)

    def _forward(self, input_ids: list[int], past: Any = None, keep_cache: bool = False) -> Any:
        """One counted forward pass, keeping only the last position's logits where the model allows it."""
        import torch

        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {"use_cache": keep_cache or past is not None}
        if self._keeps_last_logits:
            kwargs["logits_to_keep"] = 1
        if past is not None:
            kwargs[self._cache_name] = past
        self.forward_passes += 1
        return self.model(input_ids=torch.tensor([input_ids], dtype=torch.long, device=device), **kwargs)
