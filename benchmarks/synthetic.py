"""Deterministic synthetic data for the benchmark: preference pairs, SFT rows and instructions.

Seeded English words, cut with the real tokenizer to fit ``max_len - margin`` so neither side drops anything.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not but they which one "
    "you all were her she there would their we him been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three place water small light river garden "
    "music train bridge coffee map candle forest ocean bicycle lamp violin mountain kite window piano castle "
    "answer question simple careful clear short reason example number city country family story school friend "
    "paper table morning evening summer winter history science language picture problem system program market"
).split()

# Every example is cut to fit ``max_len - margin`` tokens as PrefFlow renders it; the margin leaves room for the
# one or two tokens more that TRL's chat-template tokenisation adds, so both sides train on the same examples.
# Length profile (SmolLM2 template, max_len 256): the prompt is the chat header with its default system prompt
# (30 tokens) plus an 8-72 word question; chosen and rejected are drawn independently between a fifth of the
# remaining room and all of it: a varied, OASST-like mix (prompts around a third of a sequence, responses of
# very different lengths), which is what length bucketing and prompt sharing act on.
QUESTION_STARTS = ("Explain", "Describe", "Tell me about", "Why is", "How does", "Summarise", "Compare", "List")


class SyntheticDataError(ValueError):
    """The requested sizes cannot be generated (max_len too small for the chat header, n < 1)."""


@dataclass(frozen=True)
class LengthProfile:
    """Word counts the generator draws from (before fitting to the token budget)."""

    question_words: tuple[int, int] = (8, 72)
    response_min_fraction: float = 0.2
    margin: int = 4


def _sentence_text(rng: random.Random, n_words: int) -> str:
    """``n_words`` words in sentences of 6-14 words, capitalised, ending with a full stop."""
    out: list[str] = []
    left = n_words
    while left > 0:
        k = min(left, rng.randint(6, 14))
        words = [rng.choice(WORDS) for _ in range(k)]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + ".")
        left -= k
    return " ".join(out)


def _question(rng: random.Random, n_words: int) -> str:
    return f"{rng.choice(QUESTION_STARTS)} {_sentence_text(rng, max(1, n_words))[:-1]}?"


def _fit_words(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """Drop trailing words until ``count(text) <= max_tokens`` (at least one word stays)."""
    words = text.split(" ")
    while len(words) > 1 and count(" ".join(words)) > max_tokens:
        over = count(" ".join(words)) - max_tokens
        words = words[: max(1, len(words) - max(1, over))]
    return " ".join(words)


def preference_rows(
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    max_len: int = 256,
    seed: int = 0,
    profile: LengthProfile = LengthProfile(),
) -> list[dict[str, Any]]:
    """``n`` rows ``{"id", "prompt": [user message], "chosen": str, "rejected": str}`` that fit ``max_len``."""
    from steps.chat import encode_prompt_response

    if n < 1:
        raise SyntheticDataError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        question = _question(rng, rng.randint(*profile.question_words))
        messages = [{"role": "user", "content": question}]
        prompt_ids, _ = encode_prompt_response(tokenizer, messages, "x")
        room = max_len - profile.margin - len(prompt_ids)
        if room < 8:
            need = len(prompt_ids) + 8 + profile.margin
            raise SyntheticDataError(
                f"max_len {max_len} leaves {room} tokens for responses after a "
                f"{len(prompt_ids)}-token prompt; use max_len >= {need}"
            )

        def response_tokens(text: str, messages: list = messages) -> int:
            return len(encode_prompt_response(tokenizer, messages, text)[1])

        lo = max(2, int(room * profile.response_min_fraction))
        chosen = _fit_words(_sentence_text(rng, rng.randint(lo, room)), room, response_tokens)
        rejected = _fit_words(_sentence_text(rng, rng.randint(lo, room)), room, response_tokens)
        rows.append({"id": f"bench-{seed}-{index}", "prompt": messages, "chosen": chosen, "rejected": rejected})
    return rows


def sft_rows(tokenizer: PreTrainedTokenizerBase, n: int, max_len: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows ``{"id", "prompt", "response"}``: the chosen side of :func:`preference_rows`."""
    return [
        {"id": r["id"], "prompt": r["prompt"], "response": r["chosen"]}
        for r in preference_rows(tokenizer, n, max_len, seed)
    ]


def conversational(rows: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The same rows in TRL's conversational dataset format (``kind``: "preference" or "sft")."""
    if kind == "preference":
        return [
            {
                "prompt": r["prompt"],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    if kind == "sft":
        return [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows]
    raise SyntheticDataError(f"unknown kind {kind!r}; use 'preference' or 'sft'")


def _all_instructions() -> list[str]:
    import json
    from importlib import resources

    items = json.loads(resources.files("steps.evaluate").joinpath("embedded_eval_set.json").read_text("utf-8"))
    return [item["instruction"] for item in items]


def instructions(n: int) -> list[str]:
    """The first ``n`` instructions of PrefFlow's embedded evaluation set (real prompts, fixed order)."""
    texts = _all_instructions()
    if not 1 <= n <= len(texts):
        raise SyntheticDataError(f"the embedded eval set has {len(texts)} instructions; asked for {n}")
    return texts[:n]


def repeated_instructions(n: int) -> list[str]:
    """``n`` prompts: the embedded evaluation set's instructions in order, from the start again after the last."""
    if n < 1:
        raise SyntheticDataError(f"asked for {n} instructions; need at least 1")
    texts = _all_instructions()
    return [texts[i % len(texts)] for i in range(n)]
