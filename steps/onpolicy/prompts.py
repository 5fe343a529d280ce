"""The prompts an on-policy round answers: the prepared train set's unique single-turn prompts, or a JSONL file;
never an evaluation instruction. Each round takes its own window of one seeded permutation."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.data.jsonl_lines import open_lines, parse_line

logger = logging.getLogger(__name__)

#: Keys a prepared row may name its prompt group under (OpenAssistant trees, other formats).
GROUP_KEYS = ("tree_id", "prompt_id")


class OnPolicyError(ValueError):
    """On-policy inputs or outputs that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class RoundPrompt:
    """One prompt of a round: a stable id (its group in the source, else a hash of the text) and the text."""

    prompt_id: str
    instruction: str


@dataclass
class PromptSource:
    """Every usable prompt of a source, in source order, and what was left out (counted by reason)."""

    source: str
    prompts: list[RoundPrompt]
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _text_id(text: str) -> str:
    return "prompt-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _single_turn(row: dict[str, Any]) -> str | None:
    """The user instruction of a row whose prompt is one user turn; None for multi-turn or system prompts."""
    if isinstance(row.get("instruction"), str):
        return row["instruction"]
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and len(prompt) == 1
        and isinstance(prompt[0], dict)
        and prompt[0].get("role") == "user"
        and isinstance(prompt[0].get("content"), str)
    ):
        return prompt[0]["content"]
    return None


def read_prompts(path: str | Path) -> PromptSource:
    """Unique single-turn prompts of a JSONL file (a prepared ``preference.train.jsonl`` or a prompt list with
    ``instruction`` or ``prompt``), in first-seen order. Multi-turn prompts are skipped and counted: the generation
    path answers one user instruction, as evaluation does."""
    path = Path(path)
    if not path.is_file():
        raise OnPolicyError(
            f"{path}: no such prompt file; preference.on_policy.prompts must be 'train' or an existing JSONL file"
        )
    source = PromptSource(str(path), [])
    seen: set[str] = set()
    for lineno, line in enumerate(open_lines(path), 1):
        if not line.strip():
            continue
        row, problem = parse_line(line)
        if problem is not None or not isinstance(row, dict):
            raise OnPolicyError(f"{path}:{lineno}: {problem or 'expected a JSON object'}; fix or remove the line")
        text = _single_turn(row)
        if text is None:
            has_prompt = "prompt" in row or "instruction" in row
            source.skip("multi_turn_or_system_prompt" if has_prompt else "no_prompt_field")
            continue
        if not text.strip():
            source.skip("empty_prompt")
            continue
        if text in seen:
            source.skip("duplicate_prompt")
            continue
        seen.add(text)
        group = next((row[k] for k in GROUP_KEYS if isinstance(row.get(k), (str, int))), None)
        source.prompts.append(RoundPrompt(str(group) if group is not None else _text_id(text), text))
    if source.skipped.get("no_prompt_field") and not source.prompts:
        raise OnPolicyError(f"{path}: no row has an 'instruction' or 'prompt' field; give one per line")
    logger.info("read %d prompts from %s; skipped %s", len(source.prompts), path, source.skipped or "none")
    return source


def drop_eval_prompts(source: PromptSource, eval_instructions: Iterable[str]) -> PromptSource:
    """``source`` without any prompt that is also an evaluation instruction (whitespace-insensitive), counted as
    ``in_eval_set``: on-policy rounds must not train on what they are scored on."""
    measured = {" ".join(text.split()) for text in eval_instructions}
    kept = []
    for prompt in source.prompts:
        if " ".join(prompt.instruction.split()) in measured:
            source.skip("in_eval_set")
        else:
            kept.append(prompt)
    return PromptSource(source.source, kept, dict(source.skipped))


def round_prompts(source: PromptSource, round_index: int, max_prompts: int | None, seed: int) -> list[RoundPrompt]:
    """The prompts of round ``round_index``: all of them, or with ``max_prompts`` the round's window of a seeded
    permutation (round r takes positions r*m .. r*m+m-1, wrapping), in permutation order."""
    if not source.prompts:
        raise OnPolicyError(
            f"{source.source}: no usable single-turn prompt (skipped: {source.skipped or 'none'}); on-policy rounds "
            "need prompts that are one user message"
        )
    if round_index < 0:
        raise OnPolicyError(f"round_index must be >= 0, got {round_index}")
    if max_prompts is None or max_prompts >= len(source.prompts):
        return list(source.prompts)
    order = list(range(len(source.prompts)))
    random.Random(seed).shuffle(order)
    start = round_index * max_prompts
    picked = [order[(start + offset) % len(order)] for offset in range(max_prompts)]
    return [source.prompts[i] for i in picked]


def load_round_prompts(
    prompts: str,
    data_dir: str | Path | None,
    round_index: int,
    max_prompts: int | None,
    seed: int,
    eval_instructions: Sequence[str] = (),
) -> tuple[list[RoundPrompt], dict[str, Any]]:
    """The round's prompts from ``prompts`` (``train``: ``data_dir/preference.train.jsonl``; else a JSONL path)
    with evaluation instructions removed, and a record of where they came from and what was skipped."""
    if prompts == "train":
        if data_dir is None:
            raise OnPolicyError("prompts 'train' needs the prepared data directory (data_dir)")
        path = Path(data_dir) / "preference.train.jsonl"
    else:
        path = Path(prompts).expanduser()
    source = drop_eval_prompts(read_prompts(path), eval_instructions)
    chosen = round_prompts(source, round_index, max_prompts, seed)
    record = {
        "source": source.source,
        "available": len(source.prompts),
        "skipped": source.skipped,
        "round_prompts": len(chosen),
    }
    return chosen, record
