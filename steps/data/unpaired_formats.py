"""Rows of TRL's unpaired preference layout (``data.format: unpaired``) -> one checked record, or BadRow.

Standard: ``{"prompt": str, "completion": str, "label": bool}``; conversational: ``prompt`` a list of messages ending
with the user's turn, ``completion`` one assistant message. ``label`` true = desirable (a thumb up), false =
undesirable. Optional ``id`` and ``prompt_id`` (the split groups rows by it, else by the prompt text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steps.data.pair_formats import BadRow, _check_prompt, _messages, _one_assistant, _row_id
from steps.data.records import ChatMessage

UNPAIRED_BAD_ROW_REASONS = (
    "missing_field",
    "invalid_field",
    "invalid_message",
    "prompt_not_ending_with_user",
    "empty_prompt",
    "multi_turn_completion",
    "empty_response",
    "duplicate_example",
    "duplicate_id",
)


@dataclass
class UnpairedRecord:
    prompt: list[ChatMessage]
    completion: str
    label: bool
    id: str | None = None
    group: str | None = None
    layout: str = ""


def _present(row: dict[str, Any], key: str) -> Any:
    if row.get(key) is None:
        raise BadRow("missing_field", f"missing {key}")
    return row[key]


def read_unpaired(row: Any) -> UnpairedRecord:
    """One raw row -> an UnpairedRecord (prompt ends with a non-empty user turn, completion non-empty)."""
    if not isinstance(row, dict):
        raise BadRow("invalid_field", f"row must be an object, got {type(row).__name__}")
    label = _present(row, "label")
    if not isinstance(label, bool):
        raise BadRow("invalid_field", f"label must be true (desirable) or false (undesirable), got {label!r:.40}")
    prompt, completion = _present(row, "prompt"), _present(row, "completion")
    if isinstance(prompt, str):
        messages, layout = [{"role": "user", "content": prompt}], "standard"
    else:
        messages, layout = _messages(prompt, "prompt"), "conversational"
    if isinstance(completion, str):
        text = completion
        layout += "" if isinstance(prompt, str) else "_prompt_string_completion"
    else:
        text = _one_assistant(_messages(completion, "completion"), "completion")
        layout += "_prompt_message_completion" if isinstance(prompt, str) else ""
    if not text.strip():
        raise BadRow("empty_response", "completion is empty")
    return UnpairedRecord(_check_prompt(messages), text, label, _row_id(row), _row_id(row, "prompt_id"), layout)
