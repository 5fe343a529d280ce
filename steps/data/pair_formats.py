"""Rows of the public preference schemas -> one record type: TRL (``preference``), HH-RLHF, UltraFeedback, fairseq2.

Readers return a PairRecord (SftRecord for fairseq2 instruction rows) or raise BadRow with a counted reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from steps.data.records import PROMPT_ROLES, ChatMessage

REFERENCE_KEYS = ("reference_score_chosen", "reference_score_rejected")
SCORE_KEYS = ("score_chosen", "score_rejected")


class BadRow(ValueError):
    """A row that cannot become a pair: ``reason`` is counted in the stats, ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class PairRecord:
    prompt: list[ChatMessage]
    chosen: str
    rejected: str
    id: str | None = None
    group: str | None = None
    layout: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SftRecord:
    prompt: list[ChatMessage]
    response: str
    id: str | None = None
    group: str | None = None
    layout: str = ""


def _messages(value: Any, key: str) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise BadRow("invalid_field", f"{key} must be a non-empty list of {{'role', 'content'}} messages")
    out = []
    for position, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or message.get("role") not in PROMPT_ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise BadRow(
                "invalid_message",
                f"{key}[{position}] must be {{'role': one of {PROMPT_ROLES}, 'content': str}}, got {message!r:.80}",
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _check_prompt(prompt: list[ChatMessage]) -> list[ChatMessage]:
    if not prompt:
        raise BadRow("no_common_prompt", "chosen and rejected share no prompt")
    if prompt[-1]["role"] != "user":
        raise BadRow(
            "prompt_not_ending_with_user", f"the prompt must end with a user message, not {prompt[-1]['role']!r}"
        )
    if not prompt[-1]["content"].strip():
        raise BadRow("empty_prompt", "the last user message is empty")
    return prompt


def _string(row: dict[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        raise BadRow("missing_field", f"missing {key}")
    if not isinstance(row[key], str):
        raise BadRow("invalid_field", f"{key} must be a string, got {type(row[key]).__name__}")
    return row[key]


def _one_assistant(messages: list[ChatMessage], key: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise BadRow(
            "multi_turn_completion",
            f"{key} must be exactly one assistant message after the prompt, got {[m['role'] for m in messages]}",
        )
    return messages[0]["content"]


def _finite(value: Any, key: str, reason: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow(reason, f"{key} must be a finite number, got {value!r:.40}")
    return float(value)


def _extras(row: dict[str, Any]) -> dict[str, Any]:
    """Reference scores (summed reference log-probs, both or neither) and UltraFeedback's judge scores."""
    extra: dict[str, Any] = {}
    present = [k for k in REFERENCE_KEYS if row.get(k) is not None]
    if present and len(present) != 2:
        raise BadRow("incomplete_reference_score", f"only {present[0]} is set; give both reference scores or neither")
    for key in present:
        extra[key] = _finite(row[key], key, "invalid_reference_score")
    for key in SCORE_KEYS:
        if row.get(key) is not None:
            extra[key] = _finite(row[key], key, "invalid_field")
    return extra


def _row_id(row: dict[str, Any], key: str = "id") -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise BadRow("invalid_field", f"{key} must be a non-empty string or an integer, got {value!r:.40}")
    return str(value)


def _split_common_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit standard prompt: the longest common prefix after which both replies start a new word (TRL cuts at
    the first differing character, which can split a word: ``"bl" + "ue."``)."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1

    def boundary(text: str, at: int) -> bool:
        return at == len(text) or text[at].isspace()

    cut = next((c for c in range(common, 0, -1) if boundary(chosen, c) and boundary(rejected, c)), 0)
    if not chosen[:cut].strip():
        raise BadRow(
            "no_common_prompt",
            "chosen and rejected share no prompt text (implicit-prompt rows must start with the same prompt)",
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def read_preference(row: dict[str, Any]) -> PairRecord:
    """TRL's preference layouts: standard or conversational, explicit ``prompt`` or implicit (common prefix).

    A string prompt becomes one user message and string completions become one assistant message each: PrefFlow
    always trains through the model's chat template, where TRL concatenates standard strings as raw text.
    """
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise BadRow("missing_field", f"missing {key}")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise BadRow("invalid_field", "chosen and rejected must both be strings or both be message lists")
    if chosen == rejected:
        raise BadRow("identical_responses", "chosen and rejected are the same: no preference to learn")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            text, c, r = _split_common_text(chosen, rejected)
            return PairRecord(
                _check_prompt([{"role": "user", "content": text}]), c, r, layout="standard_implicit_prompt"
            )
        layout = "standard" if isinstance(prompt, str) else "conversational_prompt_string_completions"
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        return PairRecord(_check_prompt(messages), chosen, rejected, layout=layout)
    chosen_m, rejected_m = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if prompt is None:
        common = 0
        for a, b in zip(chosen_m, rejected_m):
            if a != b:
                break
            common += 1
        return PairRecord(
            _check_prompt(chosen_m[:common]),
            _one_assistant(chosen_m[common:], "chosen"),
            _one_assistant(rejected_m[common:], "rejected"),
            layout="conversational_implicit_prompt",
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    return PairRecord(
        _check_prompt(messages),
        _one_assistant(chosen_m, "chosen"),
        _one_assistant(rejected_m, "rejected"),
        layout="conversational",
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def hh_turns(transcript: str) -> list[ChatMessage]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages (``Human`` = user); text before the first turn is an
    error, as is a transcript without turns."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRow(
            "unparsable_transcript", f"not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript: {transcript[:60]!r}"
        )
    return [
        {"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1]}
        for i in range(1, len(parts) - 1, 2)
    ]


def _last_turns_are_assistant(chosen: list[ChatMessage], rejected: list[ChatMessage]) -> None:
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise BadRow(
                "last_turn_not_assistant",
                f"{key} must end with the assistant's reply, not a {messages[-1]['role']!r} turn",
            )


def read_hh_rlhf(row: dict[str, Any]) -> PairRecord:
    """Anthropic HH-RLHF: ``chosen`` / ``rejected`` transcripts that share every turn but the last assistant one."""
    chosen, rejected = hh_turns(_string(row, "chosen")), hh_turns(_string(row, "rejected"))
    _last_turns_are_assistant(chosen, rejected)
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("prompt_mismatch", "chosen and rejected transcripts differ before their last turn")
    return PairRecord(
        _check_prompt(chosen[:-1]),
        _one_assistant(chosen[-1:], "chosen"),
        _one_assistant(rejected[-1:], "rejected"),
        layout="hh_rlhf",
    )


def read_ultrafeedback(row: dict[str, Any]) -> PairRecord:
    """UltraFeedback binarized: ``chosen`` / ``rejected`` conversations that repeat the prompt, plus ``prompt_id``
    and ``score_chosen`` / ``score_rejected`` (kept in the pair rows); string completions are read as standard."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        record = PairRecord(
            _check_prompt([{"role": "user", "content": _string(row, "prompt")}]),
            chosen,
            rejected,
            layout="ultrafeedback_strings",
        )
    else:
        if chosen is None or rejected is None:
            raise BadRow("missing_field", f"missing {'chosen' if chosen is None else 'rejected'}")
        chosen_m, rejected_m = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        _last_turns_are_assistant(chosen_m, rejected_m)
        if chosen_m[:-1] != rejected_m[:-1]:
            raise BadRow("prompt_mismatch", "chosen and rejected conversations differ before their last message")
        record = PairRecord(
            _check_prompt(chosen_m[:-1]),
            _one_assistant(chosen_m[-1:], "chosen"),
            _one_assistant(rejected_m[-1:], "rejected"),
            layout="ultrafeedback",
        )
    record.group = _row_id(row, "prompt_id")
    return record


def read_fairseq2(row: dict[str, Any]) -> PairRecord | SftRecord:
    """fairseq2 ``generic_preference`` (``src``, ``tgt_chosen``, ``tgt_rejected``) or ``generic_instruction``
    (``src``, ``tgt``) rows; ``src`` is mapped back to messages by ``fairseq2_format.parse_src``."""
    from steps.data.fairseq2_format import parse_src

    try:
        prompt, layout = parse_src(_string(row, "src"))
    except ValueError as exc:
        raise BadRow(getattr(exc, "reason", "unparsable_src"), str(exc)) from None
    if "tgt_chosen" in row or "tgt_rejected" in row:
        return PairRecord(
            _check_prompt(prompt),
            _string(row, "tgt_chosen"),
            _string(row, "tgt_rejected"),
            layout=f"generic_preference/{layout}",
        )
    if "tgt" in row:
        return SftRecord(_check_prompt(prompt), _string(row, "tgt"), layout=f"generic_instruction/{layout}")
    raise BadRow("missing_field", "neither tgt_chosen/tgt_rejected (generic_preference) nor tgt (generic_instruction)")


READERS: dict[str, Callable[[dict[str, Any]], PairRecord | SftRecord]] = {
    "preference": read_preference,
    "hh_rlhf": read_hh_rlhf,
    "ultrafeedback": read_ultrafeedback,
    "fairseq2": read_fairseq2,
}


def read_row(fmt: str, row: Any) -> PairRecord | SftRecord:
    """One raw row of format ``fmt`` -> a checked record (responses non-empty and different), or ``BadRow``."""
    if not isinstance(row, dict):
        raise BadRow("invalid_field", f"row must be an object, got {type(row).__name__}")
    record = READERS[fmt](row)
    record.id = _row_id(row)
    if isinstance(record, SftRecord):
        if not record.response.strip():
            raise BadRow("empty_response", "tgt is empty")
        return record
    record.extra = _extras(row)
    if not record.chosen.strip() or not record.rejected.strip():
        raise BadRow("empty_response", f"{'chosen' if not record.chosen.strip() else 'rejected'} is empty")
    if record.chosen.strip() == record.rejected.strip():
        raise BadRow("identical_responses", "chosen and rejected are the same text: no preference to learn")
    return record
