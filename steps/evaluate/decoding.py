"""Continuous batching for Hugging Face causal LMs: a finished answer leaves the batch at once and the next
waiting prompt takes its place, so no decode step is spent on answers that are already complete."""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from steps.evaluate.kv_cache import LiveBatch, attention_layers, left_pad
from steps.evaluate.settings import GenerationSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


class DecodingError(ValueError):
    """Prompts or a model the loop cannot decode (empty prompt, bad admission order, unsupported model)."""


@dataclass
class DecodeStats:
    """What the loop did: how often it prefilled and stepped, and how full the batch was on average."""

    prompts: int = 0
    prefill_calls: int = 0
    prefill_tokens: int = 0  # real prompt tokens (padding excluded)
    decode_steps: int = 0
    row_steps: int = 0  # sum over decode steps of the rows in the batch
    generated_tokens: int = 0
    widest_cache: int = 0  # most cache columns ever held (padding included)
    prefill_s: float = 0.0  # wall time in prefill forwards (token choice included)
    decode_s: float = 0.0  # wall time in decode-step forwards (token choice included)

    @property
    def mean_active_rows(self) -> float:
        return self.row_steps / self.decode_steps if self.decode_steps else 0.0


def row_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for prompt ``index`` under run seed ``seed`` (splitmix64 finaliser).

    Mixing rather than ``seed + index`` keeps seed 7's second prompt from drawing exactly what seed 8's first does.
    """
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (index & _MASK64) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def nucleus_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Softmax of ``logits / temperature`` (rows = sequences) keeping only the nucleus, renormalised.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``: a token is kept
    when the probability of the tokens strictly more likely than it (in sorted order) is below ``top_p``, so the
    most likely token is always kept.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def cache_argument_name(model: PreTrainedModel) -> str | None:
    """The forward keyword that takes the KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def supports_continuous_batching(model: PreTrainedModel) -> bool:
    """Decoder-only model whose forward takes a mask, explicit positions and a ``DynamicCache`` of plain layers."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    supports_cache = getattr(model, "_supports_default_dynamic_cache", None)
    if supports_cache is None or not supports_cache():
        return False
    params = inspect.signature(model.forward).parameters
    if "attention_mask" not in params or "position_ids" not in params or cache_argument_name(model) is None:
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config DynamicCache cannot read: let generate() deal with it
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


#: Spare cache columns allocated past the current width; appending writes into them in place. When they run out the
#: buffers are reallocated with this many more (one copy per this many decode steps instead of one per step).
SLACK_COLUMNS = 128

#: Prompts admitted together are prefilled together only while the shortest needs at most this many padding columns
#: to match the longest; a much longer prompt gets its own prefill. One 2,591-token IFBench prompt admitted beside 15
#: short ones would otherwise push 16 x 2,591 positions through the model (about 10 x the real prompt tokens).
PREFILL_PAD_LIMIT = 256


def prefill_groups(lengths: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Admitted prompts as ``(prompt index, length)`` in admission order -> prompt indices per prefill call, in
    that order: a prompt joins the current group while every length in it stays within ``PREFILL_PAD_LIMIT`` of
    its own, else starts the next group."""
    groups: list[list[int]] = []
    low = high = 0
    for index, length in lengths:
        if groups and max(high, length) - min(low, length) <= PREFILL_PAD_LIMIT:
            groups[-1].append(index)
            low, high = min(low, length), max(high, length)
        else:
            groups.append([index])
            low = high = length
    return groups


#: ``generation_config`` fields that change token choice and that ``model.generate`` would apply but this loop does
#: not (like vLLM given explicit sampling parameters), with the value that means "off".
_UNAPPLIED_GENERATION_FIELDS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "top_k": None,
    "min_p": None,
    "typical_p": 1.0,
    "min_new_tokens": None,
    "min_length": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
}


def unapplied_generation_settings(model: PreTrainedModel) -> dict[str, object]:
    """Settings in the model's ``generation_config`` that would alter ``generate``'s tokens but are not used here."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    found = {}
    for name, off in _UNAPPLIED_GENERATION_FIELDS.items():
        value = getattr(config, name, off)
        if value not in (off, None) and not (name == "top_k" and value == 0):
            found[name] = value
    return found


class ContinuousBatchDecoder:
    """Greedy (``temperature == 0``) or nucleus-sampled decoding of many prompts with the batch kept full.

    ``model.generate`` on a static batch computes every row until the longest answer ends. Here up to
    ``batch_size`` live sequences share one right-aligned cache (:mod:`steps.evaluate.kv_cache`): every row's real
    tokens end at the last column, shorter rows have zero-filled, masked columns on the left. A decode step feeds
    each row its last token at its own position (``position_ids`` = the row's real length, as if never padded), so
    a row computes what it would compute alone. Finished rows are dropped together with leading columns that are
    padding for every remaining row; newly admitted prompts are prefilled together (left padded among themselves;
    one far longer than the others in its own call, :func:`prefill_groups`) and stacked onto the batch. Models
    whose cache is not plain full-attention ``DynamicLayer`` s are refused
    (:func:`supports_continuous_batching`); the caller falls back to ``model.generate``.

    Reproducibility contract: greedy output is the argmax continuation of each prompt alone -- token for token the
    same as decoding it by itself, up to floating-point differences of batched arithmetic. Sampling gives every
    prompt its own ``torch.Generator`` on the model's device, seeded with ``row_seed(seed, prompt's index)``, and
    draws that prompt's tokens only from it: a run is repeatable for a given seed, prompt list, batch size, model,
    device and library versions, and a prompt's sample does not depend on which other prompts share its batch
    except through those floating-point differences.
    """

    def __init__(
        self, model: PreTrainedModel, settings: GenerationSettings, *, stop_ids: Sequence[int], pad_id: int
    ) -> None:
        cache_kwarg = cache_argument_name(model)
        if cache_kwarg is None or not supports_continuous_batching(model):
            raise DecodingError(
                f"{type(model).__name__} cannot be decoded with continuous batching (needs a "
                f"decoder-only model with plain full-attention DynamicCache layers); use "
                f"model.generate"
            )
        self.model = model
        self.settings = settings
        self.device = next(model.parameters()).device
        self.cache_kwarg = cache_kwarg
        self.keeps_last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.pad_id = int(pad_id)

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        order: Sequence[int] | None = None,
        on_finished: Callable[[int], None] | None = None,
    ) -> tuple[list[list[int]], DecodeStats]:
        """Generated ids per prompt (in ``prompts`` order, stop token included when one ended the answer).

        ``order`` is the admission order (default: as given); ``on_finished(prompt_index)`` is called as each
        answer completes.
        """
        for index, ids in enumerate(prompts):
            if len(ids) == 0:
                raise DecodingError(f"prompt {index} has no tokens; every prompt needs at least one")
        order = list(range(len(prompts))) if order is None else list(order)
        if sorted(order) != list(range(len(prompts))):
            raise DecodingError(f"order must be a permutation of 0..{len(prompts) - 1}")
        outputs: list[list[int]] = [[] for _ in prompts]
        stats = DecodeStats(prompts=len(prompts))
        waiting = deque(order)
        slack = min(self.settings.max_new_tokens, SLACK_COLUMNS)
        live = LiveBatch(slack)
        with torch.inference_mode():
            while waiting or len(live):
                free = self.settings.batch_size - len(live)
                if free > 0 and waiting:
                    admitted = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                    logger.debug(
                        "step %d: admitting prompts %s next to %d live rows", stats.decode_steps, admitted, len(live)
                    )
                    for group in prefill_groups([(i, len(prompts[i])) for i in admitted]):
                        newcomers = self._prefill([list(prompts[i]) for i in group], group, stats, slack)
                        self._record(newcomers, outputs, stats, on_finished)
                        live.merge(newcomers)
                else:
                    self._step(live, stats)
                    self._record(live, outputs, stats, on_finished)
        return outputs, stats

    # -- model calls -------------------------------------------------------------------------------------------

    def _prefill(self, prompt_ids: list[list[int]], indices: list[int], stats: DecodeStats, slack: int) -> LiveBatch:
        """Run the prompts through the model together (left padded) and pick each one's first token."""
        started = time.perf_counter()
        input_ids, real = left_pad(prompt_ids, self.pad_id)
        width = input_ids.shape[1]
        positions = (real.cumsum(-1) - 1).clamp(min=0)  # each prompt starts at position 0, as if unpadded
        input_ids, real, positions = (t.to(self.device) for t in (input_ids, real, positions))
        cache = DynamicCache(config=self.model.config)
        kwargs = {"logits_to_keep": 1} if self.keeps_last_logits else {}
        logits = self.model(
            input_ids=input_ids,
            attention_mask=real,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: cache},
            **kwargs,
        ).logits[:, -1, :]
        if width > min(len(ids) for ids in prompt_ids):
            # padded columns hold whatever the model computed for pad tokens (NaN where a fully masked row's
            # softmax was 0/0): zero them so a masked column can never leak NaN into an attention sum
            pad = (real == 0)[:, None, :, None]
            for layer, keys, values in attention_layers(cache):
                layer.keys = keys.masked_fill(pad, 0.0)
                layer.values = values.masked_fill(pad, 0.0)
        batch = LiveBatch(slack)
        batch.cache = cache
        batch.prompt_index = list(indices)
        batch.cached = [len(ids) for ids in prompt_ids]
        batch.generators = [self._generator(i) for i in indices]
        batch.last_token = self._choose(logits, batch.generators)
        stats.prefill_calls += 1
        stats.prefill_tokens += sum(batch.cached)
        stats.prefill_s += time.perf_counter() - started
        return batch

    def _step(self, live: LiveBatch, stats: DecodeStats) -> None:
        """Feed every row its last token at its own position; the cache grows by one column for all rows."""
        started = time.perf_counter()
        width = live.width
        cached = torch.tensor(live.cached, dtype=torch.long, device=self.device)
        columns = torch.arange(width + 1, device=self.device)
        attention_mask = (columns[None, :] >= (width - cached)[:, None]).long()
        input_ids = torch.tensor(live.last_token, dtype=torch.long, device=self.device)[:, None]
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=cached[:, None],
            use_cache=True,
            **{self.cache_kwarg: live.cache},
        ).logits[:, -1, :]
        live.cached = [n + 1 for n in live.cached]
        live.last_token = self._choose(logits, live.generators)
        stats.decode_steps += 1
        stats.row_steps += len(live)
        stats.widest_cache = max(stats.widest_cache, width + 1)
        stats.decode_s += time.perf_counter() - started

    # -- token choice and bookkeeping ------------------------------------------------------------------------------

    def _generator(self, prompt_index: int) -> torch.Generator | None:
        if not self.settings.do_sample:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(row_seed(self.settings.seed, prompt_index))
        return generator

    def _choose(self, logits: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
        if not self.settings.do_sample:
            return logits.argmax(dim=-1).tolist()
        probs = nucleus_probabilities(logits, self.settings.temperature, self.settings.top_p)
        picks = [torch.multinomial(probs[row], 1, generator=generators[row]) for row in range(len(generators))]
        return torch.cat(picks).tolist()

    def _record(
        self, live: LiveBatch, outputs: list[list[int]], stats: DecodeStats, on_finished: Callable[[int], None] | None
    ) -> None:
        """Append each row's new token; rows that hit a stop id or the token limit leave the batch."""
        keep = []
        for row, (index, token) in enumerate(zip(live.prompt_index, live.last_token)):
            outputs[index].append(token)
            stats.generated_tokens += 1
            if token in self.stop_ids or len(outputs[index]) >= self.settings.max_new_tokens:
                if on_finished is not None:
                    on_finished(index)
            else:
                keep.append(row)
        live.keep(keep)
