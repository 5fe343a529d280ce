"""Chat formatting shared by training and generation, so both use the same prompt and the same end token.

The end-of-turn token is read from the tokenizer's chat template and the model's generation config (any family).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

LLAMA3_BEGIN = "<|begin_of_text|>"
LLAMA3_HEADER_START = "<|start_header_id|>"
LLAMA3_HEADER_END = "<|end_header_id|>"
LLAMA3_EOT = "<|eot_id|>"
_LLAMA3_TOKENS = (LLAMA3_BEGIN, LLAMA3_HEADER_START, LLAMA3_HEADER_END, LLAMA3_EOT)

#: Probe texts rendered through a chat template to see which token it writes after an assistant reply. Plain
#: words without surrounding whitespace, so templates that ``trim``/``strip`` content leave them unchanged.
PROBE_USER = "PrefflowProbeQuestion"
PROBE_REPLY = "PrefflowProbeReply"
GENERATION_CONFIG_FILE = "generation_config.json"

#: ``end_of_turn_token_id`` results per tokenizer object, keyed by what they depend on (template, eos, ...).
_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple, tuple[int, tuple[int, ...]]]] = weakref.WeakKeyDictionary()


class ChatFormatError(ValueError):
    """Messages or a tokenizer that cannot be turned into a chat prompt."""


def has_token(tokenizer: PreTrainedTokenizerBase, token: str | None) -> bool:
    """Whether ``token`` is in the vocabulary (added tokens included) rather than mapping to unk."""
    if not token:
        return False
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and (token_id != tokenizer.unk_token_id or token == tokenizer.unk_token)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise ChatFormatError(
            f"token {token!r} is not one token of tokenizer {getattr(tokenizer, 'name_or_path', '?')}"
        )
    return token_id


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
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
    if _is_llama3_without_template(tokenizer):
        return render_llama3_prompt(messages)
    raise ChatFormatError(
        f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template "
        f"and no Llama-3 header tokens {_LLAMA3_TOKENS}; use an instruct/chat model's tokenizer or set "
        f"tokenizer.chat_template"
    )


# ----------------------------------------------------------------------------- end of turn from the template


def _render_probe(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str | None:
    """The template's rendering of a probe conversation, or None when the template refuses it (role rules)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as exc:  # a template may raise_exception() on roles it does not support
        logger.debug("chat template refused the probe conversation %s: %s", [m["role"] for m in messages], exc)
        return None
    return text if isinstance(text, str) else None


def _first_control_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The first token of ``text`` after whitespace if it is a special/added token (one atomic control token)."""
    control = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token_id in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if token_id in control:
            return int(token_id)
        if str(tokenizer.decode([token_id])).strip():
            return None  # ordinary text comes first: the template closes the turn with plain text (or nothing)
    return None


def template_end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant reply's text, or None.

    Renders ``[user, assistant]`` with probe texts and reads the first control token after the reply (whitespace
    skipped): ``<|im_end|>`` (ChatML), ``<|eot_id|>`` (Llama-3), ``<end_of_turn>`` (Gemma), ``<|end|>`` (Phi-3),
    ``</s>`` (Mistral, Llama-2). A template that writes nothing after the last reply is asked again with a user
    turn following it; the text between the two, less the opening that also stands in front of the first user
    message (a role header), is what closes the reply.
    """
    if not tokenizer.chat_template:
        return None
    user, reply = {"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_REPLY}
    last = _render_probe(tokenizer, [user, reply])
    if last is not None and PROBE_REPLY in last:
        found = _first_control_token(tokenizer, last.split(PROBE_REPLY, 1)[1])
        if found is not None:
            return found
    followed, alone = _render_probe(tokenizer, [user, reply, user]), _render_probe(tokenizer, [user])
    if followed is None or alone is None or PROBE_REPLY not in followed or PROBE_USER not in alone:
        return None
    between = followed.split(PROBE_REPLY, 1)[1].split(PROBE_USER, 1)[0]
    opener = alone.split(PROBE_USER, 1)[0]
    shared = 0  # length of the text both end with: the next turn's opening
    while shared < min(len(between), len(opener)) and between[-1 - shared] == opener[-1 - shared]:
        shared += 1
    return _first_control_token(tokenizer, between[: len(between) - shared])


# ----------------------------------------------------------------------------- generation config


def _eos_list(value: Any, source: str) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ChatFormatError(f"{source}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return [int(v) for v in values]


def _generation_config_path(tokenizer: PreTrainedTokenizerBase) -> Path | None:
    """``generation_config.json`` beside the tokenizer: its save directory, or the local Hub cache (no network)."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if not name:
        return None
    directory = Path(name).expanduser()
    if directory.is_dir():
        candidate = directory / GENERATION_CONFIG_FILE
        return candidate if candidate.is_file() else None
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):  # a Hub id
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, GENERATION_CONFIG_FILE)
        return Path(cached) if isinstance(cached, str) else None
    return None


def generation_eos_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """The model's generation-config eos ids (where ``model.generate`` stops), [] when unknown.

    ``generation_config``: a ``GenerationConfig`` (``model.generation_config``), a mapping, or a path to a
    directory or ``generation_config.json``; by default the file beside the tokenizer's own files.
    """
    if generation_config is None:
        path = _generation_config_path(tokenizer)
        if path is None:
            return []
        generation_config = path
    if isinstance(generation_config, (str, Path)):
        path = Path(generation_config)
        path = path / GENERATION_CONFIG_FILE if path.is_dir() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ChatFormatError(f"{path}: cannot read the generation config ({exc}); fix or remove the file") from exc
        if not isinstance(data, dict):
            raise ChatFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return _eos_list(data.get("eos_token_id"), str(path))
    if isinstance(generation_config, Mapping):
        return _eos_list(generation_config.get("eos_token_id"), "generation_config")
    return _eos_list(getattr(generation_config, "eos_token_id", None), type(generation_config).__name__)


# ----------------------------------------------------------------------------- end of turn and stop ids


def _cache_key(tokenizer: PreTrainedTokenizerBase, generation_config: Any) -> tuple:
    template = tokenizer.chat_template
    template_key = json.dumps(template, sort_keys=True) if isinstance(template, dict) else template
    if generation_config is None or isinstance(generation_config, (str, Path)):
        gen_key: Any = str(generation_config)
    else:
        gen_key = tuple(generation_eos_token_ids(tokenizer, generation_config))
    return (template_key, tokenizer.eos_token_id, len(tokenizer), getattr(tokenizer, "name_or_path", None), gen_key)


def _resolve(tokenizer: PreTrainedTokenizerBase, generation_config: Any) -> tuple[int, tuple[int, ...]]:
    """(end-of-turn id, stop ids), computed once per tokenizer state: encoding calls this for every example."""
    key = _cache_key(tokenizer, generation_config)
    per_tokenizer = _CACHE.setdefault(tokenizer, {})
    if key in per_tokenizer:
        return per_tokenizer[key]
    name = getattr(tokenizer, "name_or_path", "?")
    generation_ids = generation_eos_token_ids(tokenizer, generation_config)
    eos = tokenizer.eos_token_id
    from_template = template_end_of_turn_token_id(tokenizer)
    if from_template is not None:
        end, source = from_template, "chat template"
        if generation_ids and end not in generation_ids:
            logger.warning(
                "tokenizer %s: the chat template ends replies with %r (id %d) but the generation config's eos ids "
                "%s do not include it; PrefFlow trains on it and stops on it, but model.generate() elsewhere "
                "would not: add %d to generation_config.eos_token_id",
                name,
                tokenizer.convert_ids_to_tokens(end),
                end,
                generation_ids,
                end,
            )
    elif _is_llama3_without_template(tokenizer):
        end, source = _token_id(tokenizer, LLAMA3_EOT), "Llama-3 header tokens (no template)"
    elif generation_ids:
        end, source = generation_ids[0], "generation config eos"
    elif eos is not None:
        end, source = int(eos), "tokenizer eos"
    else:
        raise ChatFormatError(
            f"tokenizer {name}: no end-of-turn token (its chat template writes no special token after a reply, "
            f"there is no generation_config.json eos id) and no eos token; set tokenizer.eos_token or a chat "
            f"template that closes assistant turns with a special token"
        )
    stops = tuple(dict.fromkeys([end, *generation_ids, *([int(eos)] if eos is not None else [])]))
    logger.info(
        "tokenizer %s: end of turn %r (id %d, from the %s); stop ids %s",
        name,
        tokenizer.convert_ids_to_tokens(end),
        end,
        source,
        list(stops),
    )
    per_tokenizer[key] = (end, stops)
    return end, stops


def end_of_turn_token_id(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> int:
    """The id that ends an assistant turn: targets end with it and generation stops on it.

    In order: the special token the chat template writes after a reply (``template_end_of_turn_token_id``);
    ``<|eot_id|>`` for a Llama-3 tokenizer without a template; the generation config's first eos id
    (``generation_eos_token_ids``); the tokenizer's eos.
    """
    return _resolve(tokenizer, generation_config)[0]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any = None) -> list[int]:
    """Ids generation stops on: end-of-turn first, then the generation config's eos ids and the tokenizer's eos
    (a model may emit any of them)."""
    return list(_resolve(tokenizer, generation_config)[1])


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


def decode_response(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int], generation_config: Any = None) -> str:
    """Text of generated ids, cut before the first stop token (end-of-turn or eos); other special tokens dropped."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    stops = set(stop_token_ids(tokenizer, generation_config))
    cut = next((i for i, token in enumerate(ids) if int(token) in stops), len(ids))
    return str(tokenizer.decode(ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False))
