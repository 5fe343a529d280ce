"""The decode loop's KV cache: rows right aligned in one ``DynamicCache`` whose layers keep spare columns, so
rows can leave and join between steps and a step writes its new column in place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [rows, longest] on CPU: every prompt ends at the last column."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def attention_layers(cache: DynamicCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """``(layer, keys, values)`` for every layer of a filled cache: all this loop holds are full-attention
    ``DynamicLayer`` s (``decoding.supports_continuous_batching`` checks the model), each written at least once."""
    out = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise TypeError(f"the decode cache holds an unfilled or non-attention layer ({type(layer).__name__})")
        out.append((layer, layer.keys, layer.values))
    return out


class SlackLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of buffers with spare columns on the right.

    ``DynamicLayer.update`` concatenates, copying the whole cache every decode step -- about a tenth of a batch-8
    step of the 135M model on CPU. Here a step writes its one column into the spare room in place. Rows are right
    aligned: a buffer holds ``[batch, heads, length + spare, dim]``, real data in the first ``length`` columns,
    zeros for left padding. Only this loop builds them; ``update``, ``batch_select_indices`` and ``crop`` keep
    the buffers and the views consistent.
    """

    keys: torch.Tensor  # always set here (DynamicLayer allows None before its first update)
    values: torch.Tensor

    def __init__(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], slack: int) -> None:
        """One layer holding every part's rows, each right aligned to the widest part, zeros on the left."""
        super().__init__()
        self.slack = max(1, slack)
        width = max(keys.shape[-2] for keys, _ in parts)
        rows = sum(keys.shape[0] for keys, _ in parts)
        first_keys, first_values = parts[0]
        self.key_buffer = first_keys.new_zeros((rows, first_keys.shape[1], width + self.slack, first_keys.shape[-1]))
        self.value_buffer = first_values.new_zeros(
            (rows, first_values.shape[1], width + self.slack, first_values.shape[-1])
        )
        row = 0
        for keys, values in parts:
            n, w = keys.shape[0], keys.shape[-2]
            self.key_buffer[row : row + n, :, width - w : width, :] = keys
            self.value_buffer[row : row + n, :, width - w : width, :] = values
            row += n
        self._set_length(width)
        self.device, self.is_initialized = first_keys.device, True

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self.key_buffer[..., :length, :]
        self.values = self.value_buffer[..., :length, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:  # out of spare columns: move to bigger buffers (rare)
            spare = max(self.slack, key_states.shape[-2])
            self.key_buffer = F.pad(self.keys, (0, 0, 0, spare))
            self.value_buffer = F.pad(self.values, (0, 0, 0, spare))
        self.key_buffer[..., self.length : end, :] = key_states
        self.value_buffer[..., self.length : end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def select(self, rows: torch.Tensor, drop_leading: int) -> None:
        """Keep only ``rows`` and drop the first ``drop_leading`` columns (copies the kept rows once)."""
        self.key_buffer = self.key_buffer[rows, :, drop_leading:, :]
        self.value_buffer = self.value_buffer[rows, :, drop_leading:, :]
        self._set_length(self.length - drop_leading)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices, 0)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self._set_length(self.length + tokens_to_remove)


class LiveBatch:
    """The sequences being decoded: one right-aligned cache of ``SlackLayer`` s plus each row's bookkeeping."""

    def __init__(self, slack: int) -> None:
        self.cache: DynamicCache | None = None
        self.slack = slack
        self.prompt_index: list[int] = []  # which prompt each row is
        self.cached: list[int] = []  # real tokens in the cache per row (prompt + generated, last one excluded)
        self.last_token: list[int] = []  # generated token not yet fed to the model
        self.generators: list[torch.Generator | None] = []

    def __len__(self) -> int:
        return len(self.prompt_index)

    @property
    def width(self) -> int:
        return attention_layers(self.cache)[0][1].shape[-2] if self.cache is not None else 0

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` and the leading columns that are then padding for all rows."""
        if len(rows) == len(self):
            return
        for name in ("prompt_index", "cached", "last_token", "generators"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in rows])
        if not rows or self.cache is None:
            self.cache = None
            return
        width, needed = self.width, max(self.cached)
        layers = attention_layers(self.cache)
        index = torch.tensor(rows, dtype=torch.long, device=layers[0][1].device)
        for layer, keys, values in layers:
            if isinstance(layer, SlackLayer):
                layer.select(index, width - needed)
            else:  # a plain DynamicLayer (rows that finished right after prefill, before any merge)
                layer.keys = keys[index, :, width - needed :, :]
                layer.values = values[index, :, width - needed :, :]

    def merge(self, other: LiveBatch) -> None:
        """Append ``other``'s rows, left padding the narrower cache so both end at the same column."""
        if other.cache is None:
            return
        theirs = attention_layers(other.cache)
        if self.cache is None:
            self.cache = other.cache
            self.cache.layers = [SlackLayer([(keys, values)], self.slack) for _, keys, values in theirs]
        else:
            self.cache.layers = [
                SlackLayer([(my_keys, my_values), (keys, values)], self.slack)
                for (_, my_keys, my_values), (_, keys, values) in zip(attention_layers(self.cache), theirs)
            ]
        for name in ("prompt_index", "cached", "last_token", "generators"):
            getattr(self, name).extend(getattr(other, name))
