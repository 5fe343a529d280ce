"""Chat formatting shared by training and generation, so both use the same prompt and the same end token.

A training example is ``prompt_ids + response_ids`` where the prompt is the rendered conversation ending
with the assistant header and the response ends with the model's end-of-turn token; generation feeds the
same prompt ids and stops on that same token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML_END = "<|im_end|>"
LLAMA3_BEGIN = "<|begin_of_text|>"
LLAMA3_HEADER_START = "<|start_header_id|>"
LLAMA3_HEADER_END = "<|end_header_id|>"
LLAMA3_EOT = "<|eot_id|>"
_LLAMA3_TOKENS = (LLAMA3_BEGIN, LLAMA3_HEADER_START, LLAMA3_HEADER_END, LLAMA3_EOT)


class ChatFormatError(ValueError):
    """Messages or a tokenizer that cannot be turned into a chat prompt."""


def has_token(tokenizer: PreTrainedTokenizerBase, token: str | None) -> bool:
    """Whether ``token`` is in the vocabulary (added tokens included) rather than mapping to unk."""
    if not token:
        return False
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and (token_id != tokenizer.unk_token_id or token == tokenizer.unk_token)


def _is_llama3_without_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return not tokenizer.chat_template and all(has_token(tokenizer, t) for t in _LLAMA3_TOKENS)


def _check_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise ChatFormatError(f"messages[{index}] must be a dict with string 'role' and 'content', got {message!r}")


def render_llama3_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The Llama-3 chat format, ending with an open assistant header (for tokenizers without a template)."""
    turns = "".join(
        f"{LLAMA3_HEADER_START}{m['role']}{LLAMA3_HEADER_END}\n\n{m['content']}{LLAMA3_EOT}" for m in messages
    )
    return f"{LLAMA3_BEGIN}{turns}{LLAMA3_HEADER_START}assistant{LLAMA3_HEADER_END}\n\n"


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]]) -> str:
    """The conversation as text, ending with the assistant generation header, special tokens included.

    Uses the tokenizer's chat template (``add_generation_prompt=True``) when it has one -- for SmolLM2 that
    template also inserts its default system prompt. A Llama-3 base tokenizer has the Llama-3 header tokens but
    no template: the Llama-3 format is used. Anything else is an error: guessing a format silently would train
    and evaluate on a prompt the model was never meant to see.
    """
    _check_messages(messages)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if _is_llama3_without_template(tokenizer):
        return render_llama3_prompt(messages)
    raise ChatFormatError(
        f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template "
        f"and no Llama-3 header tokens {_LLAMA3_TOKENS}; use an instruct/chat model's tokenizer or set "
        f"tokenizer.chat_template"
    )


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that ends an assistant turn: targets end with it and generation stops on it.

    ``<|im_end|>`` for ChatML templates (SmolLM2), ``<|eot_id|>`` for Llama-3 (template or fallback),
    otherwise the eos token.
    """
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is what render_prompt uses
        template = template.get("default", "")
    if template:
        for token in (CHATML_END, LLAMA3_EOT):
            if token in template and has_token(tokenizer, token):
                return int(tokenizer.convert_tokens_to_ids(token))
    elif _is_llama3_without_template(tokenizer):
        return int(tokenizer.convert_tokens_to_ids(LLAMA3_EOT))
    if tokenizer.eos_token_id is None:
        raise ChatFormatError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no end-of-turn token "
            f"({CHATML_END}, {LLAMA3_EOT}) and no eos token"
        )
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids generation should stop on: end-of-turn first, plus eos when it differs (a model may emit either)."""
    ids = [end_of_turn_token_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]], response: str
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``: the rendered prompt and ``response + end-of-turn``, tokenized apart.

    Both are tokenized with ``add_special_tokens=False``: the rendered prompt already holds every special token
    the format needs (Llama-3's ``<|begin_of_text|>``; SmolLM2 has no BOS at all), so letting the tokenizer add
    its own would put a second BOS in front for Llama-3 tokenizers. This follows the Hugging Face convention that
    a chat template carries its own BOS.

    Why split here: the prompt ids are exactly what generation feeds the model, and the model then produces
    the response tokens after them, so training on the same split trains what generation does. For SmolLM2
    (and Llama-3) the prompt ends with a newline that the pre-tokenizer keeps as its own piece before ordinary
    text, so ``prompt_ids + response_ids`` equals tokenizing the whole rendered conversation up to and
    including the end-of-turn token. The two differ only where BPE would merge across the boundary, i.e. a
    response starting with whitespace (``"\\n\\nHello"``: the full text would merge the prompt's final newline
    with the response's); the text is identical either way, and we keep the split the model sees when it
    generates.
    """
    if not isinstance(response, str):
        raise ChatFormatError(f"response must be a string, got {type(response).__name__}")
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    end_id = end_of_turn_token_id(tokenizer)
    body_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if end_id in body_ids:
        raise ChatFormatError(
            f"response text contains the end-of-turn token "
            f"{tokenizer.convert_ids_to_tokens(end_id)!r}; remove it from the data: "
            f"{response[:80]!r}"
        )
    return list(prompt_ids), list(body_ids) + [end_id]


def decode_response(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> str:
    """Text of generated ids, cut before the first end-of-turn (or eos) token; other special tokens dropped."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    stops = set(stop_token_ids(tokenizer))
    cut = next((i for i, token in enumerate(ids) if int(token) in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)
