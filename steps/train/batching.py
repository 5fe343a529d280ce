"""Tokenised examples and length-bucketed micro-batches under a token budget (over-long examples dropped or
truncated, both counted). Batch order is a pure function of (seed, epoch): resume reproduces an uninterrupted
run, and every rank plans the same batches."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from steps.train.attention import CHOSEN, PADDING, PROMPT, REJECTED

if TYPE_CHECKING:
    from steps.data.records import ChatMessage

logger = logging.getLogger(__name__)


@dataclass
class SFTExample:
    id: str
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def tokens(self) -> int:
        """Tokens of the one training sequence (LengthStats.tokens sums them)."""
        return self.length


@dataclass
class PairExample:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    reference_chosen: float | None = None
    reference_rejected: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def tokens(self) -> int:
        """Tokens of the two training sequences, prompt + chosen and prompt + rejected (LengthStats.tokens)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def sort_length(self) -> int:
        """What length bucketing sorts on: the shared-prompt row (prompt once, then both responses),
        the layout ``collate_pairs`` picks for most batches."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


_Example = TypeVar("_Example", SFTExample, PairExample)


@dataclass
class LengthStats:
    kept: int = 0
    dropped_overlength: int = 0
    truncated: int = 0
    tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _fit(prompt: list[int], responses: list[list[int]], max_len: int) -> tuple[list[int], list[list[int]]]:
    """Truncate to ``max_len``: the prompt loses its oldest tokens first (down to half the budget),
    then responses lose their tails. Keeping the prompt's end keeps the assistant header intact."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_len:
        return prompt, responses
    keep_prompt = max(min(len(prompt), max_len // 2), max_len - longest)
    keep_prompt = min(keep_prompt, len(prompt))
    prompt = prompt[len(prompt) - keep_prompt :]
    room = max_len - len(prompt)
    return prompt, [r[:room] for r in responses]


def _tokenize(
    rows: Sequence[dict],
    tokenizer: Any,
    max_seq_len: int,
    overlength: Literal["drop", "truncate"],
    texts: Callable[[dict], tuple[list[ChatMessage], list[str]]],
    build: Callable[[str, dict, list[int], list[list[int]]], _Example],
) -> tuple[list[_Example], LengthStats]:
    """Encode each row's prompt and responses (``texts``), fit them to ``max_seq_len`` as ``overlength`` says
    (counted in the stats), and ``build(id, row, prompt_ids, response_ids)`` an example of what is kept."""
    from steps.chat import encode_prompt_response

    out: list[_Example] = []
    stats = LengthStats()
    for row in rows:
        prompt, responses = texts(row)
        encoded = [encode_prompt_response(tokenizer, prompt, response) for response in responses]
        prompt_ids, ids = encoded[0][0], [response_ids for _, response_ids in encoded]
        if len(prompt_ids) + max(len(r) for r in ids) > max_seq_len:
            if overlength == "drop":
                stats.dropped_overlength += 1
                continue
            prompt_ids, ids = _fit(prompt_ids, ids, max_seq_len)
            stats.truncated += 1
        example = build(str(row.get("id", len(out))), row, prompt_ids, ids)
        stats.kept += 1
        stats.tokens += example.tokens
        out.append(example)
    return out, stats


def tokenize_sft(
    rows: Sequence[dict], tokenizer: Any, max_seq_len: int, overlength: Literal["drop", "truncate"] = "drop"
) -> tuple[list[SFTExample], LengthStats]:
    from steps.data.records import sft_messages

    def texts(row: dict) -> tuple[list[ChatMessage], list[str]]:
        prompt, response = sft_messages(row)
        return prompt, [response]

    def build(example_id: str, row: dict, prompt_ids: list[int], ids: list[list[int]]) -> SFTExample:
        return SFTExample(example_id, prompt_ids, ids[0])

    return _tokenize(rows, tokenizer, max_seq_len, overlength, texts, build)


def tokenize_pairs(
    rows: Sequence[dict], tokenizer: Any, max_seq_len: int, overlength: Literal["drop", "truncate"] = "drop"
) -> tuple[list[PairExample], LengthStats]:
    from steps.data.records import pair_messages

    def texts(row: dict) -> tuple[list[ChatMessage], list[str]]:
        prompt, chosen, rejected = pair_messages(row)
        return prompt, [chosen, rejected]

    def build(example_id: str, row: dict, prompt_ids: list[int], ids: list[list[int]]) -> PairExample:
        chosen_ids, rejected_ids = ids
        reference = row.get("reference_score_chosen"), row.get("reference_score_rejected")
        return PairExample(example_id, prompt_ids, chosen_ids, rejected_ids, *reference)

    return _tokenize(rows, tokenizer, max_seq_len, overlength, texts, build)


def make_batches(
    examples: Sequence,
    max_num_tokens: int,
    seed: int,
    epoch: int,
    rows_per_example: int = 1,
    shuffle: bool = True,
    max_examples: int | None = None,
) -> list[list[int]]:
    """Indices of examples grouped into micro-batches: sorted by length (``sort_length`` where the
    example has one; random tie-break), cut greedily so that rows x longest ``length`` <= max_num_tokens
    and, when ``max_examples`` is given, at most that many examples per batch (a fixed batch size with
    length bucketing); then the batch order is shuffled."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lambda i: getattr(examples[i], "sort_length", examples[i].length))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        length = examples[i].length
        new_longest = max(longest, length)
        full = max_examples is not None and len(current) >= max_examples
        if current and (full or new_longest * rows_per_example * (len(current) + 1) > max_num_tokens):
            batches.append(current)
            current, new_longest = [], length
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


@dataclass
class TokenBatch:
    """Right-padded sequences and a mask of the positions whose tokens are scored."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    target_mask: torch.Tensor  # [N, L] True where the token at that position is scored
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens of the logical rows (a shared prompt counts once per response)."""
        if "num_tokens" in self.extra:
            return int(self.extra["num_tokens"])
        return int(self.attention_mask.sum())

    def to(self, device: Any, non_blocking: bool = False) -> TokenBatch:
        """The batch on ``device``; ``non_blocking`` copies from pinned memory (:meth:`pin_memory`) without waiting."""
        return TokenBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
            self.target_mask.to(device, non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in self.extra.items()},
        )

    def pin_memory(self) -> TokenBatch:
        """The batch in page-locked host memory, so that a CUDA copy runs asynchronously (``to(..., non_blocking)``)."""
        return TokenBatch(
            self.input_ids.pin_memory(),
            self.attention_mask.pin_memory(),
            self.target_mask.pin_memory(),
            {k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v for k, v in self.extra.items()},
        )


def collate(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, mask_source_tokens: bool = True
) -> TokenBatch:
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    target = torch.zeros((n, width), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        start = len(p) if mask_source_tokens else 1
        target[i, start : len(s)] = True
    return TokenBatch(ids, attn, target)


def collate_sft(examples: Sequence[SFTExample], pad_id: int, mask_source_tokens: bool = True) -> TokenBatch:
    return collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], pad_id, mask_source_tokens)


def collate_pairs(
    examples: Sequence[PairExample], pad_id: int, mask_source_tokens: bool = True, share_prompt: bool | None = None
) -> TokenBatch:
    """Chosen rows first, then rejected rows: one forward pass scores both sides.

    ``share_prompt``: True puts each pair in one row, prompt once (see :func:`collate_shared_prompt`);
    False gives one right-padded row per response; None (default) shares when that cuts the positions
    the model computes, padding included, by at least ``1 - SHARE_PROMPT_MAX_RATIO``.
    Either way ``sequence_logprobs`` returns the chosen sums then the rejected sums.
    """
    if share_prompt is None:
        share_prompt = shared_prompt_pays(examples)
    if share_prompt:
        batch = collate_shared_prompt(examples, pad_id, mask_source_tokens)
    else:
        prompts = [e.prompt_ids for e in examples] * 2
        responses = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
        batch = collate(prompts, responses, pad_id, mask_source_tokens)
    if all(e.reference_chosen is not None and e.reference_rejected is not None for e in examples):
        batch.extra["reference_chosen"] = torch.tensor([e.reference_chosen for e in examples], dtype=torch.float64)
        batch.extra["reference_rejected"] = torch.tensor([e.reference_rejected for e in examples], dtype=torch.float64)
    batch.extra["num_pairs"] = len(examples)
    return batch


# Share the prompt when the shared layout computes at most this fraction of the separate layout's
# positions (padding included). The shared rows are longer, so attention (quadratic in row length)
# grows while everything else (linear in positions) shrinks; below ~15 % savings it is not worth it.
SHARE_PROMPT_MAX_RATIO = 0.85


def shared_prompt_pays(examples: Sequence[PairExample]) -> bool:
    """Would the shared-prompt layout compute clearly fewer positions than one row per response?"""
    if not examples:
        return False
    separate = 2 * len(examples) * max(e.length for e in examples)
    shared = len(examples) * max(e.sort_length for e in examples)
    return shared <= SHARE_PROMPT_MAX_RATIO * separate


def collate_shared_prompt(examples: Sequence[PairExample], pad_id: int, mask_source_tokens: bool = True) -> TokenBatch:
    """One row per pair: ``prompt + chosen + rejected``, right-padded, with a tree attention mask.

    The prompt is computed once. Chosen tokens see the prompt and the chosen tokens before them; rejected
    tokens see the prompt and the rejected tokens before them (never the chosen ones), and both responses
    take position ids that continue from the prompt, so every hidden state equals the one the separate
    rows would give. ``extra`` carries what the mask is made of, not the mask: per-token segment ids
    ([N, L] int8, :mod:`steps.train.attention` turns them into the mask the model takes, on its device),
    the position ids, and the scored (flat hidden index, target token, output row) triples: the first
    rejected token is predicted from the last prompt position, not from the chosen tokens before it.
    Output rows 0..N-1 are the chosen responses, N..2N-1 the rejected ones, as in the separate layout.
    """
    n = len(examples)
    width = max(e.sort_length for e in examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    target = torch.zeros((n, width), dtype=torch.bool)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), PADDING, dtype=torch.int8)
    index: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    logical_tokens = 0

    def score(row: int, predictors: torch.Tensor, tokens: list[int]) -> None:
        index.append(predictors)
        targets.append(torch.tensor(tokens, dtype=torch.long))
        rows.append(torch.full((len(tokens),), row, dtype=torch.long))

    for i, e in enumerate(examples):
        p, c, r = e.prompt_ids, e.chosen_ids, e.rejected_ids
        np_, nc, nr = len(p), len(c), len(r)
        total = np_ + nc + nr
        logical_tokens += 2 * np_ + nc + nr
        ids[i, :total] = torch.tensor(p + c + r, dtype=torch.long)
        attn[i, :total] = 1
        positions[i, :np_] = torch.arange(np_)
        positions[i, np_ : np_ + nc] = torch.arange(np_, np_ + nc)
        positions[i, np_ + nc : total] = torch.arange(np_, np_ + nr)
        segment[i, :np_], segment[i, np_ : np_ + nc], segment[i, np_ + nc : total] = PROMPT, CHOSEN, REJECTED
        base = i * width
        if not mask_source_tokens and np_ > 1:  # prompt tokens count for both responses
            target[i, 1:np_] = True
            for row in (i, n + i):
                score(row, base + torch.arange(0, np_ - 1), p[1:])
        # response token j is predicted from the position before it; the first one from the prompt's end
        skip = 1 if np_ == 0 else 0  # no position predicts a first token that has no prompt before it
        chosen_pred = torch.arange(np_ - 1, np_ - 1 + nc)[skip:]
        score(i, base + chosen_pred, c[skip:])
        rejected_pred = torch.cat([torch.tensor([np_ - 1]), torch.arange(np_ + nc, np_ + nc + nr - 1)])[skip:]
        score(n + i, base + rejected_pred, r[skip:])
        target[i, np_ + skip : np_ + nc] = True
        target[i, np_ + nc + skip : total] = True

    batch = TokenBatch(ids, attn, target)
    batch.extra.update(
        segment_ids=segment,
        position_ids=positions,
        score_index=torch.cat(index),
        score_targets=torch.cat(targets),
        score_rows=torch.cat(rows),
        num_rows=2 * n,
        num_tokens=logical_tokens,
        pad_id=pad_id,
        mask_source_tokens=mask_source_tokens,
        pair_lengths=torch.tensor(
            [[len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)] for e in examples], dtype=torch.long
        ),
    )
    return batch


def separate_layout(batch: TokenBatch) -> TokenBatch:
    """The one-row-per-response batch holding the same pairs as a shared-prompt batch (for attention
    implementations that take no custom mask: flash-attention & co.). Reference scores and ``num_pairs`` are
    carried over."""
    if "pair_lengths" not in batch.extra:
        return batch
    ids = batch.input_ids.cpu()
    prompts, chosen, rejected = [], [], []
    for i, (np_, nc, nr) in enumerate(batch.extra["pair_lengths"].tolist()):
        row = ids[i].tolist()
        prompts.append(row[:np_])
        chosen.append(row[np_ : np_ + nc])
        rejected.append(row[np_ + nc : np_ + nc + nr])
    out = collate(prompts * 2, chosen + rejected, batch.extra["pad_id"], batch.extra["mask_source_tokens"])
    out.extra.update(
        {k: v for k, v in batch.extra.items() if k in ("reference_chosen", "reference_rejected", "num_pairs")}
    )
    return out.to(batch.input_ids.device)
