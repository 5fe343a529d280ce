"""fairseq2 instruction / preference JSONL rows with the Llama-3 chat prompt.

``src`` is the conversation rendered with the Llama-3 header tokens and ending with the assistant header, so the
model continues with the reply. It carries no ``<|begin_of_text|>``: fairseq2's Llama-3 tokenizer adds it when it
encodes the source. ``tgt`` / ``tgt_chosen`` / ``tgt_rejected`` are the bare reply texts: the trainer appends the
end-of-turn token when it encodes the target, and generation must stop on that same token. Turn texts are
whitespace-stripped, as Llama-3's own chat template does.
"""
from __future__ import annotations

from typing import Any, Sequence

from steps.data.oasst_examples import ChatMessage, PreferencePair, SftExample

LLAMA3_TURN = "<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
LLAMA3_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def render_llama3_prompt(messages: Sequence[ChatMessage]) -> str:
    """Llama-3 chat prompt for ``messages`` (roles user/assistant), ending with the assistant header."""
    turns = [LLAMA3_TURN.format(role=m["role"], text=m["content"].strip()) for m in messages]
    return "".join(turns) + LLAMA3_ASSISTANT_HEADER


def sft_row(example: SftExample) -> dict[str, Any]:
    return {"id": example.id, "src": render_llama3_prompt(example.prompt), "tgt": example.response.strip()}


def preference_row(pair: PreferencePair) -> dict[str, Any]:
    return {
        "id": pair.id,
        "src": render_llama3_prompt(pair.prompt),
        "tgt_chosen": pair.chosen.strip(),
        "tgt_rejected": pair.rejected.strip(),
    }
