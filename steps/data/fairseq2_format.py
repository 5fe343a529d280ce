"""fairseq2 instruction / preference JSONL rows with the Llama-3 chat prompt, written and read back.

``render_llama3_prompt`` / ``sft_row`` / ``preference_row`` write them; ``parse_src`` maps a ``src`` back to messages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from steps.data.records import PROMPT_ROLES, ChatMessage

LLAMA3_BEGIN = "<|begin_of_text|>"
LLAMA3_TURN = "<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
LLAMA3_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>")
_TURN = re.compile(r"<\|start_header_id\|>([a-z]+)<\|end_header_id\|>\n\n(.*)", re.DOTALL)


class SrcFormatError(ValueError):
    """A ``src`` that holds Llama-3 header tokens but not the structure ``render_llama3_prompt`` writes."""

    reason = "unparsable_src"


def render_llama3_prompt(messages: Sequence[ChatMessage]) -> str:
    """Llama-3 chat prompt for ``messages``, ending with the assistant header, so the model continues with the reply.

    It carries no ``<|begin_of_text|>``: fairseq2's Llama-3 tokenizer adds it when it encodes the source. Targets
    (``tgt``, ``tgt_chosen``, ``tgt_rejected``) are the bare reply texts: the trainer appends the end-of-turn token.
    Turn texts are whitespace-stripped, as Llama-3's own chat template does.
    """
    turns = [LLAMA3_TURN.format(role=m["role"], text=m["content"].strip()) for m in messages]
    return "".join(turns) + LLAMA3_ASSISTANT_HEADER


def parse_src(src: str) -> tuple[list[ChatMessage], str]:
    """``(messages, layout)`` for a fairseq2 ``src``: the inverse of :func:`render_llama3_prompt`.

    ``layout`` is ``llama3`` when ``src`` has the Llama-3 header structure (an optional leading
    ``<|begin_of_text|>``, turns, and the open assistant header at the end), else ``plain``: a ``src`` without any
    Llama-3 special token becomes one user message holding the whole text. What is lost on the way back: the
    exact whitespace around turn texts (the renderer strips it); the leading ``<|begin_of_text|>`` (the chat
    template of the model being trained adds its own); and, for ``plain`` sources, the raw prompt string itself,
    which fairseq2 would feed as-is but PrefFlow wraps in the model's chat template. A ``src`` that holds Llama-3
    special tokens without that structure (e.g. a pre-filled assistant reply after the last header) raises
    :class:`SrcFormatError`: wrapping header tokens inside a user message would train on garbage.
    """
    if not any(token in src for token in LLAMA3_SPECIAL):
        return [{"role": "user", "content": src}], "plain"
    body = src[len(LLAMA3_BEGIN) :] if src.startswith(LLAMA3_BEGIN) else src
    if not body.endswith(LLAMA3_ASSISTANT_HEADER):
        raise SrcFormatError(
            f"src has Llama-3 header tokens but does not end with the open assistant header {LLAMA3_ASSISTANT_HEADER!r}"
        )
    body = body[: -len(LLAMA3_ASSISTANT_HEADER)]
    segments = body.split("<|eot_id|>")
    if segments[-1] != "":
        raise SrcFormatError(f"text after the last <|eot_id|> and before the assistant header: {segments[-1][:60]!r}")
    messages: list[ChatMessage] = []
    for segment in segments[:-1]:
        match = _TURN.fullmatch(segment)
        if not match or match.group(1) not in PROMPT_ROLES or any(t in match.group(2) for t in LLAMA3_SPECIAL):
            raise SrcFormatError(
                f"not a '<|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|>' turn "
                f"(ROLE one of {PROMPT_ROLES}): {segment[:80]!r}"
            )
        messages.append({"role": match.group(1), "content": match.group(2)})
    if not messages:
        raise SrcFormatError("src holds only the assistant header: no prompt turns")
    return messages, "llama3"


def sft_row(example: Any) -> dict[str, Any]:
    return {"id": example.id, "src": render_llama3_prompt(example.prompt), "tgt": example.response.strip()}


def preference_row(pair: Any) -> dict[str, Any]:
    """``generic_preference`` row; reference scores ride along when the pair has them (fairseq2 then skips its
    reference model)."""
    row = {
        "id": pair.id,
        "src": render_llama3_prompt(pair.prompt),
        "tgt_chosen": pair.chosen.strip(),
        "tgt_rejected": pair.rejected.strip(),
    }
    if getattr(pair, "reference_score_chosen", None) is not None:
        row["reference_score_chosen"] = pair.reference_score_chosen
        row["reference_score_rejected"] = pair.reference_score_rejected
    return row
