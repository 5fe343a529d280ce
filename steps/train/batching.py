"""Tokenised examples and length-bucketed batches under a token budget.

Examples are tokenised once with the model's chat template (steps.chat), over-long ones are
dropped or truncated (both counted), and each epoch groups examples of similar length into
micro-batches whose padded size stays under ``max_num_tokens``. Batch order is a pure function
of (seed, epoch), which is what makes resume-from-checkpoint reproduce an uninterrupted run.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass
class SFTExample:
    id: str
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class PairExample:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    reference_chosen: Optional[float] = None
    reference_rejected: Optional[float] = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


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
    prompt = prompt[len(prompt) - keep_prompt:]
    room = max_len - len(prompt)
    return prompt, [r[:room] for r in responses]


def tokenize_sft(rows: Sequence[dict], tokenizer, max_seq_len: int,
                 overlength: Literal["drop", "truncate"] = "drop") -> tuple[list[SFTExample], LengthStats]:
    from steps.chat import encode_prompt_response

    out, stats = [], LengthStats()
    for row in rows:
        p, r = encode_prompt_response(tokenizer, row["prompt"], row["response"])
        if len(p) + len(r) > max_seq_len:
            if overlength == "drop":
                stats.dropped_overlength += 1
                continue
            p, (r,) = _fit(p, [r], max_seq_len)
            stats.truncated += 1
        ex = SFTExample(str(row.get("id", len(out))), p, r)
        stats.kept += 1
        stats.tokens += ex.length
        out.append(ex)
    return out, stats


def tokenize_pairs(rows: Sequence[dict], tokenizer, max_seq_len: int,
                   overlength: Literal["drop", "truncate"] = "drop") -> tuple[list[PairExample], LengthStats]:
    from steps.chat import encode_prompt_response

    out, stats = [], LengthStats()
    for row in rows:
        p, c = encode_prompt_response(tokenizer, row["prompt"], row["chosen"])
        _, r = encode_prompt_response(tokenizer, row["prompt"], row["rejected"])
        if len(p) + max(len(c), len(r)) > max_seq_len:
            if overlength == "drop":
                stats.dropped_overlength += 1
                continue
            p, (c, r) = _fit(p, [c, r], max_seq_len)
            stats.truncated += 1
        ex = PairExample(str(row.get("id", len(out))), p, c, r,
                         row.get("reference_score_chosen"), row.get("reference_score_rejected"))
        stats.kept += 1
        stats.tokens += len(p) * 2 + len(c) + len(r)
        out.append(ex)
    return out, stats


def make_batches(examples: Sequence, max_num_tokens: int, seed: int, epoch: int,
                 rows_per_example: int = 1, shuffle: bool = True) -> list[list[int]]:
    """Indices of examples grouped into micro-batches: sorted by length (random tie-break), cut
    greedily so that rows x longest <= max_num_tokens, then the batch order is shuffled."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lambda i: examples[i].length)
    batches, current, longest = [], [], 0
    for i in order:
        length = examples[i].length
        new_longest = max(longest, length)
        if current and new_longest * rows_per_example * (len(current) + 1) > max_num_tokens:
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
        return int(self.attention_mask.sum())

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.target_mask.to(device),
                          {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.extra.items()})


def collate(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int,
            mask_source_tokens: bool = True) -> TokenBatch:
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
        target[i, start: len(s)] = True
    return TokenBatch(ids, attn, target)


def collate_sft(examples: Sequence[SFTExample], pad_id: int, mask_source_tokens: bool = True) -> TokenBatch:
    return collate([e.prompt_ids for e in examples], [e.response_ids for e in examples], pad_id, mask_source_tokens)


def collate_pairs(examples: Sequence[PairExample], pad_id: int, mask_source_tokens: bool = True) -> TokenBatch:
    """Chosen rows first, then rejected rows: one forward pass scores both sides."""
    prompts = [e.prompt_ids for e in examples] * 2
    responses = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    batch = collate(prompts, responses, pad_id, mask_source_tokens)
    if all(e.reference_chosen is not None and e.reference_rejected is not None for e in examples):
        batch.extra["reference_chosen"] = torch.tensor([e.reference_chosen for e in examples], dtype=torch.float64)
        batch.extra["reference_rejected"] = torch.tensor([e.reference_rejected for e in examples], dtype=torch.float64)
    batch.extra["num_pairs"] = len(examples)
    return batch
