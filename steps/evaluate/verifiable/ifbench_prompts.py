"""IFBench prompts: reading the package's prompt file, the deterministic subset rule, the prompt-set hash, and
matching a model's responses to prompts."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.io import JsonlError, read_jsonl

#: Prompts in the package's IFBench_test.jsonl (26.3).
IFBENCH_PROMPTS = 294
SUBSET_RULE = (
    "type-balanced prefix: prompts grouped by their first instruction type, types in name order and prompts by "
    "numeric key within a type, taken round-robin across types (one of each type, then a second of each, ...); "
    "the first `limit` of that order, returned in key order. Every limit's subset contains the smaller ones'; "
    "57 covers every type once; no limit means all 294."
)


class IFBenchInputError(ValueError):
    """A prompt file or a responses file that cannot be used; the message names the file, record and fix."""


@dataclass(frozen=True)
class IFBenchPrompt:
    """One prompt with the instructions its verifiers check (``kwargs[i]`` are instruction i's arguments)."""

    key: str
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[Mapping[str, Any], ...]

    def record(self) -> dict[str, Any]:
        """The prompt as the package's file writes it (what the prompt-set hash covers)."""
        return {
            "key": self.key,
            "prompt": self.prompt,
            "instruction_id_list": list(self.instruction_ids),
            "kwargs": [dict(k) for k in self.kwargs],
        }


def _prompt_from_record(row: Any, where: str) -> IFBenchPrompt:
    if not isinstance(row, dict):
        raise IFBenchInputError(f"{where}: expected a JSON object")
    key, prompt, ids, kwargs = (row.get(f) for f in ("key", "prompt", "instruction_id_list", "kwargs"))
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise IFBenchInputError(f"{where}: field 'key' must be a string or integer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise IFBenchInputError(f"{where}: field 'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise IFBenchInputError(f"{where}: field 'instruction_id_list' must be a non-empty list of strings")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise IFBenchInputError(f"{where}: field 'kwargs' must be a list of objects, one per instruction id")
    return IFBenchPrompt(str(key), prompt, tuple(ids), tuple(kwargs))


def read_prompts(path: Path) -> list[IFBenchPrompt]:
    """All prompts of an IFBench prompt file (JSONL with key, prompt, instruction_id_list, kwargs), in file order."""
    try:
        rows = read_jsonl(path)
    except (OSError, JsonlError) as exc:
        raise IFBenchInputError(f"{path}: cannot read the IFBench prompts ({exc})") from exc
    prompts = [_prompt_from_record(row, f"{path} record {i + 1}") for i, row in enumerate(rows)]
    if not prompts:
        raise IFBenchInputError(f"{path}: no prompts")
    seen: set[str] = set()
    for p in prompts:
        if p.key in seen:
            raise IFBenchInputError(f"{path}: key {p.key!r} appears twice; keys identify prompts")
        seen.add(p.key)
    return prompts


def _key_order(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def select_prompts(prompts: Sequence[IFBenchPrompt], limit: int | None) -> list[IFBenchPrompt]:
    """The subset :data:`SUBSET_RULE` describes: all prompts when ``limit`` is None or covers them all."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None (all prompts), got {limit!r}")
    ordered = sorted(prompts, key=lambda p: _key_order(p.key))
    if limit is None or limit >= len(ordered):
        return ordered
    by_type: dict[str, list[IFBenchPrompt]] = defaultdict(list)
    for p in ordered:
        by_type[p.instruction_ids[0]].append(p)
    queues = [by_type[t] for t in sorted(by_type)]
    chosen: list[IFBenchPrompt] = []
    depth = 0
    while len(chosen) < limit:
        chosen.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return sorted(chosen[:limit], key=lambda p: _key_order(p.key))


def prompt_set_sha256(prompts: Sequence[IFBenchPrompt]) -> str:
    """sha256 of the prompts' records (canonical JSON, one per line, in the given order): names a prompt set."""
    lines = (json.dumps(p.record(), sort_keys=True, ensure_ascii=False, separators=(",", ":")) for p in prompts)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def match_responses(
    prompts: Sequence[IFBenchPrompt], records: Sequence[Mapping[str, Any]], source: str = "responses"
) -> dict[str, str]:
    """Each prompt's response, by key: a record names its prompt by ``key``, else by the exact ``prompt`` text.

    Records for other prompts (outside a subset) are ignored; a prompt without a response, or with two, is an
    error naming the file and the fix.
    """
    known = {p.key: p for p in prompts}
    by_text = {p.prompt: p.key for p in prompts}
    responses: dict[str, str] = {}
    for index, row in enumerate(records):
        where = f"{source} record {index}"
        if not isinstance(row, Mapping) or not isinstance(row.get("response"), str):
            raise IFBenchInputError(f"{where}: needs a string field 'response' (the model's answer)")
        if row.get("key") is not None:
            key = str(row["key"])
        elif isinstance(row.get("prompt"), str):
            key = by_text.get(row["prompt"], "")
        else:
            raise IFBenchInputError(f"{where}: needs 'key' or 'prompt' to say which IFBench prompt it answers")
        if key not in known:
            continue
        if key in responses:
            raise IFBenchInputError(f"{where}: a second response for prompt key {key!r}; give one per prompt")
        responses[key] = row["response"]
    missing = [p.key for p in prompts if p.key not in responses]
    if missing:
        raise IFBenchInputError(
            f"{source}: no response for {len(missing)} of {len(prompts)} prompts (keys {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}). Fix: answer every selected prompt, matching by 'key' or by "
            f"the exact 'prompt' text."
        )
    return responses
