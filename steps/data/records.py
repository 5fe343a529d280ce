"""The row layouts PrefFlow writes, and the one reader the trainer uses for them.

Pair rows follow TRL's conversational preference layout; :func:`pair_messages` also reads the older string layout.
KTO rows follow TRL's conversational unpaired layout (``prompt``, ``completion``, ``label``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ChatMessage = dict[str, str]
PROMPT_ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A prepared SFT / pair row that the trainer cannot read."""


def assistant_turn(text: str) -> list[ChatMessage]:
    """TRL's conversational completion: one assistant message."""
    return [{"role": "assistant", "content": text}]


def _completion_text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and value[0].get("role") == "assistant"
        and isinstance(value[0].get("content"), str)
    ):
        return value[0]["content"]
    raise RecordError(
        f"row {row.get('id', '?')}: {key!r} must be a string or [{{'role': 'assistant', 'content': str}}]"
        f", got {value!r:.120}"
    )


def _prompt(row: dict[str, Any]) -> list[ChatMessage]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise RecordError(
        f"row {row.get('id', '?')}: 'prompt' must be a non-empty list of {{'role', 'content'}} "
        f"messages or a string, got {prompt!r:.120}"
    )


def pair_messages(row: dict[str, Any]) -> tuple[list[ChatMessage], str, str]:
    """``(prompt messages, chosen text, rejected text)`` of a pair row.

    Reads TRL's conversational layout (``chosen`` / ``rejected`` = ``[{"role": "assistant", "content"}]``), which
    ``prepare_data`` writes, and the plain-string layout (``chosen`` / ``rejected`` strings) that older PrefFlow
    files and hand-made rows use. A string ``prompt`` becomes one user message.
    """
    return _prompt(row), _completion_text(row, "chosen"), _completion_text(row, "rejected")


def sft_messages(row: dict[str, Any]) -> tuple[list[ChatMessage], str]:
    """``(prompt messages, response text)`` of an SFT row: ``response`` (PrefFlow) or TRL's ``completion``."""
    key = "response" if "response" in row else "completion"
    return _prompt(row), _completion_text(row, key)


def unpaired_messages(row: dict[str, Any]) -> tuple[list[ChatMessage], str, bool]:
    """``(prompt messages, completion text, desirable?)`` of a KTO row (TRL's unpaired layout, conversational or
    with strings)."""
    label = row.get("label")
    if not isinstance(label, bool):
        raise RecordError(f"row {row.get('id', '?')}: 'label' must be true (desirable) or false, got {label!r:.40}")
    return _prompt(row), _completion_text(row, "completion"), label


def kto_row(
    id: str, group_key: str, group_id: str, prompt: Sequence[ChatMessage], completion: str, label: bool, **extra: Any
) -> dict[str, Any]:
    """A KTO row in TRL's conversational unpaired layout; ``extra`` (source, feedback) follows in the order given."""
    return {
        "id": id,
        group_key: group_id,
        "prompt": list(prompt),
        "completion": assistant_turn(completion),
        "label": label,
        **extra,
    }


def pair_row(
    id: str, group_key: str, group_id: str, prompt: Sequence[ChatMessage], chosen: str, rejected: str, **extra: Any
) -> dict[str, Any]:
    """A pair row in TRL's conversational layout; ``extra`` (ranks, scores) follows in the order given."""
    return {
        "id": id,
        group_key: group_id,
        "prompt": list(prompt),
        "chosen": assistant_turn(chosen),
        "rejected": assistant_turn(rejected),
        **extra,
    }


def sft_row(id: str, group_key: str, group_id: str, prompt: Sequence[ChatMessage], response: str) -> dict[str, Any]:
    return {"id": id, group_key: group_id, "prompt": list(prompt), "response": response}


class DataError(ValueError):
    """Input data that cannot be used: missing file, unreadable format, nothing usable left."""
