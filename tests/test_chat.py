"""steps.chat: prompt rendering, end-of-turn tokens and prompt/response encoding.

ChatML (SmolLM2), Llama-3, Gemma, Phi-3 and Mistral/Mixtral, each with its published chat template and special
tokens on the real SmolLM2 tokenizer (built locally, no Hub), plus the Llama-3-without-template fallback."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from steps.chat import (
    ChatFormatError,
    decode_response,
    encode_prompt_response,
    end_of_turn_token_id,
    generation_eos_token_ids,
    render_prompt,
    stop_token_ids,
    template_end_of_turn_token_id,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Another one?"},
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def byte_level_tokenizer(specials: list[str], add_bos: bool, chat_template: str | None = None):
    """An offline byte-level tokenizer (one token per byte, no merges) with the given special tokens.

    With ``add_bos`` its post-processor prepends ``<|begin_of_text|>`` like the real Llama-3 tokenizer does.
    """
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    if add_bos:
        bos_id = backend.token_to_id("<|begin_of_text|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    if "<|begin_of_text|>" in specials:
        tokenizer.bos_token = "<|begin_of_text|>"
    if "<|end_of_text|>" in specials:
        tokenizer.eos_token = "<|end_of_text|>"
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def llama3_base_tokenizer():
    return byte_level_tokenizer(LLAMA3_SPECIALS, add_bos=True)


# ------------------------------------------------------------------------------------------------ Llama-3


def test_llama3_prompt_written_out(llama3_base_tokenizer):
    assert llama3_base_tokenizer.chat_template is None
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a prime number.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n7<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnother one?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render_prompt(llama3_base_tokenizer, CONVERSATION) == expected


def test_llama3_end_of_turn_and_stop_ids(llama3_base_tokenizer):
    eot = llama3_base_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    eos = llama3_base_tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    assert end_of_turn_token_id(llama3_base_tokenizer) == eot
    assert stop_token_ids(llama3_base_tokenizer) == [eot, eos]


def test_llama3_encoding_has_one_bos_and_ends_with_eot(llama3_base_tokenizer):
    tok = llama3_base_tokenizer
    bos, eot = tok.convert_tokens_to_ids("<|begin_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok("x")["input_ids"][0] == bos  # the tokenizer itself would add a BOS...
    prompt_ids, response_ids = encode_prompt_response(tok, QUESTION, "Paris.")
    assert prompt_ids.count(bos) == 1 and prompt_ids[0] == bos  # ...but the prompt holds exactly one
    assert response_ids[-1] == eot and response_ids.count(eot) == 1
    # one id per byte for ordinary text, one id per special token
    assert response_ids[:-1] == [tok.convert_tokens_to_ids(ch) for ch in "Paris."]
    full = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
    )
    assert prompt_ids + response_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert decode_response(tok, response_ids + [tok.convert_tokens_to_ids("<|end_of_text|>")]) == "Paris."


def test_tokenizer_without_template_or_llama3_tokens_is_an_error():
    plain = byte_level_tokenizer(["<|end_of_text|>"], add_bos=False)
    with pytest.raises(ChatFormatError, match="no chat template"):
        render_prompt(plain, QUESTION)
    assert end_of_turn_token_id(plain) == plain.convert_tokens_to_ids("<|end_of_text|>")


def test_bad_messages_are_rejected(llama3_base_tokenizer):
    with pytest.raises(ChatFormatError, match=r"messages\[1\]"):
        render_prompt(llama3_base_tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant"}])
    with pytest.raises(ChatFormatError, match="non-empty"):
        render_prompt(llama3_base_tokenizer, [])
    with pytest.raises(ChatFormatError, match="response must be a string"):
        encode_prompt_response(llama3_base_tokenizer, QUESTION, None)


def test_template_takes_precedence_over_the_llama3_fallback():
    template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    tok = byte_level_tokenizer(LLAMA3_SPECIALS, add_bos=True, chat_template=template)
    assert render_prompt(tok, QUESTION) == (
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert end_of_turn_token_id(tok) == tok.convert_tokens_to_ids("<|eot_id|>")


# ------------------------------------------------------------------------------------------ SmolLM2 ChatML


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_prompt_and_end_of_turn(tokenizer):
    assert render_prompt(tokenizer, QUESTION) == (
        SMOL_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert end_of_turn_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert stop_token_ids(tokenizer) == [2]  # eos is <|im_end|> too


@pytest.mark.parametrize("messages", [QUESTION, CONVERSATION], ids=["single", "multi-turn"])
@pytest.mark.parametrize(
    "response",
    [
        "Paris is the capital of France.",
        "Sure!\n\n1. First\n2. Second  (two spaces)\n\nDone.",
        "Ünïcödé — 東京 🙂",
        "```python\nprint('x')\n```",
    ],
)
def test_smollm2_encoding_matches_full_template(tokenizer, messages, response):
    prompt_ids, response_ids = encode_prompt_response(tokenizer, messages, response)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert response_ids[-1] == im_end and im_end not in response_ids[:-1]
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert header[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and prompt_ids[-len(header) :] == header
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == prompt_ids[0]  # no extra BOS in front
    assert tokenizer.decode(prompt_ids) == render_prompt(tokenizer, messages)

    full = tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": response}], tokenize=False)
    up_to_end = full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
    assert prompt_ids + response_ids == tokenizer(up_to_end, add_special_tokens=False)["input_ids"]
    assert decode_response(tokenizer, response_ids) == response


def test_leading_whitespace_response_keeps_the_generation_split(tokenizer):
    """BPE may merge the prompt's final newline with a response's leading newlines; we keep the prompt ids that
    generation feeds the model, so the ids can differ from whole-text tokenization while the text is equal."""
    response = "\n\nParis."
    prompt_ids, response_ids = encode_prompt_response(tokenizer, QUESTION, response)
    assert prompt_ids == tokenizer(render_prompt(tokenizer, QUESTION), add_special_tokens=False)["input_ids"]
    full_text = render_prompt(tokenizer, QUESTION) + response + "<|im_end|>"
    assert tokenizer.decode(prompt_ids + response_ids) == full_text
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    assert response_ids[:2] == [newline, newline]
    assert prompt_ids + response_ids != tokenizer(full_text, add_special_tokens=False)["input_ids"]


def test_response_containing_end_of_turn_is_rejected(tokenizer):
    with pytest.raises(ChatFormatError, match="end-of-turn"):
        encode_prompt_response(tokenizer, QUESTION, "Paris.<|im_end|> and more")


def test_decode_response_cuts_at_end_of_turn(tokenizer):
    ids = tokenizer("Paris.", add_special_tokens=False)["input_ids"]
    im_end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    tail = tokenizer("garbage after the turn", add_special_tokens=False)["input_ids"]
    assert decode_response(tokenizer, ids + [im_end] + tail + [pad, pad]) == "Paris."
    assert decode_response(tokenizer, ids) == "Paris."  # no end token: everything
    import torch

    assert decode_response(tokenizer, torch.tensor(ids + [im_end, im_end])) == "Paris."


# ------------------------------------------------------------------ template families on a real tokenizer
#
# The chat templates below are configuration copied verbatim from each model's published tokenizer_config.json
# (test data); the special tokens are the ones those configs declare. They are added to the real SmolLM2
# tokenizer, so the ids differ from the real models' but the text handling is the real tokenizer's.

LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (  # google/gemma-7b-it (the gemma-2 *-it template is the same)
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (  # microsoft/Phi-3-mini-4k-instruct
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor "
    "%}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MIXTRAL_TEMPLATE = (  # mistralai/Mixtral-8x7B-Instruct-v0.1
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V01_TEMPLATE = (  # mistralai/Mistral-7B-Instruct-v0.1 (first release: a space after eos)
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA2_TEMPLATE = (  # meta-llama/Llama-2-13b-chat-hf (a space before eos)
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
Q = "What is the capital of France?"


@dataclass(frozen=True)
class Family:
    name: str
    template: str | None  # None: keep the SmolLM2 tokenizer as it ships (ChatML)
    tokens: dict[str, str | None]  # bos/eos/unk/pad as the published tokenizer_config.json declares them
    added: tuple[str, ...]  # further special tokens of that config
    generation_eos: tuple[str, ...]  # generation_config.json eos_token_id, as tokens
    prompt: str  # render_prompt([{"user": Q}]) written out
    end_of_turn: str
    stops: tuple[str, ...]  # end-of-turn, then the generation config's eos ids, then the tokenizer's eos
    pad: str  # the pad token the pad policy must pick (never the end-of-turn)
    # prompt + response ids equal the whole text's ids; False where SmolLM2's pre-tokenizer (GPT-2 regex) splits
    # the prompt's final "\n\n" as "\n" + "\n" before a letter but keeps it whole at the end of the prompt
    # (the real Llama-3 regex keeps newline runs together); the text is equal either way
    whole_text_ids: bool = True


FAMILIES = [
    Family(
        "chatml-smollm2",
        None,
        {},
        (),
        ("<|im_end|>",),
        SMOL_SYSTEM + f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>",
        ("<|im_end|>",),
        "<|endoftext|>",
    ),
    Family(
        "llama3",
        LLAMA3_TEMPLATE,
        {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "unk": None, "pad": None},
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        ("<|end_of_text|>", "<|eot_id|>"),
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        ("<|eot_id|>", "<|end_of_text|>"),
        "<|end_of_text|>",
        whole_text_ids=False,
    ),
    Family(
        "gemma",
        GEMMA_TEMPLATE,
        {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>"},
        ("<start_of_turn>", "<end_of_turn>"),
        ("<eos>",),  # gemma-7b-it's generation config stops on <eos> only: the template is what says <end_of_turn>
        f"<bos><start_of_turn>user\n{Q}<end_of_turn>\n<start_of_turn>model\n",
        "<end_of_turn>",
        ("<end_of_turn>", "<eos>"),
        "<pad>",
    ),
    Family(
        "phi3",
        PHI3_TEMPLATE,
        {"bos": "<s>", "eos": "<|endoftext|>", "unk": "<unk>", "pad": "<|endoftext|>"},
        ("<|assistant|>", "<|end|>", "<|system|>", "<|user|>"),
        ("<|endoftext|>", "<|assistant|>", "<|end|>"),  # [32000, 32001, 32007]
        f"<|user|>\n{Q}<|end|>\n<|assistant|>\n",
        "<|end|>",
        ("<|end|>", "<|endoftext|>", "<|assistant|>"),
        "<|endoftext|>",
    ),
    Family(
        "mixtral",
        MIXTRAL_TEMPLATE,
        {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None},
        (),
        ("</s>",),
        f"<s>[INST] {Q} [/INST]",
        "</s>",
        ("</s>",),
        "<unk>",  # eos is the end-of-turn, so the pad policy takes unk
    ),
    Family(
        "mistral-v0.1",
        MISTRAL_V01_TEMPLATE,
        {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None},
        (),
        ("</s>",),
        f"<s>[INST] {Q} [/INST]",
        "</s>",
        ("</s>",),
        "<unk>",
    ),
]
FAMILY_IDS = [f.name for f in FAMILIES]


def build_family_tokenizer(directory, family: Family, generation_eos: tuple[str, ...] | None = None):
    """The SmolLM2 tokenizer given ``family``'s special tokens and template, saved with a generation config and
    loaded back the way a model directory is (then the pad policy of steps.models.tokenizers)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from steps.models.embedded import ensure_embedded_model
    from steps.models.specs import DEFAULT_EMBEDDED
    from steps.models.tokenizers import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(str(ensure_embedded_model(DEFAULT_EMBEDDED)))
    if family.template is not None:
        names = [t for t in family.tokens.values() if t] + list(family.added)
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in names], special_tokens=True)
        for role in ("bos", "eos", "unk", "pad"):
            setattr(tok, f"{role}_token", family.tokens.get(role))
        tok.chat_template = family.template
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    ids = [tok.convert_tokens_to_ids(t) for t in (family.generation_eos if generation_eos is None else generation_eos)]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    loaded = AutoTokenizer.from_pretrained(str(directory))
    ensure_pad_token(loaded)
    return loaded


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f.name: build_family_tokenizer(root / f.name, f) for f in FAMILIES}


def ids_of(tok, tokens) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_family_prompt_is_the_published_format(family_tokenizers, family):
    assert render_prompt(family_tokenizers[family.name], [{"role": "user", "content": Q}]) == family.prompt


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_family_end_of_turn_stop_ids_and_pad(family_tokenizers, family):
    tok = family_tokenizers[family.name]
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    assert eot != tok.unk_token_id and tok.convert_ids_to_tokens(eot) == family.end_of_turn
    assert template_end_of_turn_token_id(tok) == eot
    assert end_of_turn_token_id(tok) == eot
    assert stop_token_ids(tok) == ids_of(tok, family.stops)
    assert generation_eos_token_ids(tok) == ids_of(tok, family.generation_eos)  # read beside the tokenizer
    assert tok.pad_token == family.pad and tok.pad_token_id != eot


TURNS = {
    "single": [{"role": "user", "content": Q}],
    "multi-turn": [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": Q},
    ],
}


@pytest.mark.parametrize("turns", list(TURNS), ids=list(TURNS))
@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_family_training_targets_end_with_its_end_of_turn(family_tokenizers, family, turns):
    tok, messages, response = family_tokenizers[family.name], TURNS[turns], "Paris is the capital of France."
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    prompt_ids, response_ids = encode_prompt_response(tok, messages, response)
    assert response_ids[-1] == eot and eot not in response_ids[:-1]
    # the template's own rendering of the whole conversation, up to the end token after the reply
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    reply_at = full.rindex(response)
    up_to_end = full[: full.index(family.end_of_turn, reply_at) + len(family.end_of_turn)]
    assert full[reply_at + len(response) : len(up_to_end) - len(family.end_of_turn)] == ""  # nothing in between
    assert tok.decode(prompt_ids + response_ids) == up_to_end
    assert prompt_ids == tok(render_prompt(tok, messages), add_special_tokens=False)["input_ids"]
    if family.whole_text_ids:
        assert prompt_ids + response_ids == tok(up_to_end, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_family_generation_stops_on_its_end_of_turn(family_tokenizers, family):
    tok = family_tokenizers[family.name]
    body = tok("Paris.", add_special_tokens=False)["input_ids"]
    tail = tok(" and then more text", add_special_tokens=False)["input_ids"]
    for stop in family.stops:  # the end-of-turn, or any eos the model's generation config stops on
        generated = body + [tok.convert_tokens_to_ids(stop)] + tail
        assert decode_response(tok, generated) == "Paris.", stop
    assert decode_response(tok, body + tail) == "Paris. and then more text"


def test_llama2_space_before_eos_is_skipped(tmp_path):
    family = Family(
        "llama2",
        LLAMA2_TEMPLATE,
        {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None},
        (),
        ("</s>",),
        f"<s>[INST] {Q} [/INST]",
        "</s>",
        ("</s>",),
        "<unk>",
    )
    tok = build_family_tokenizer(tmp_path / "llama2", family)
    full = tok.apply_chat_template(
        [{"role": "user", "content": Q}, {"role": "assistant", "content": "Hi"}], tokenize=False
    )
    assert full.endswith(" Hi </s>")  # the template writes a space between the reply and eos
    assert render_prompt(tok, [{"role": "user", "content": Q}]) == family.prompt
    assert end_of_turn_token_id(tok) == tok.convert_tokens_to_ids("</s>")


def test_gemma_generation_config_without_end_of_turn_is_reported(tmp_path, caplog):
    gemma = next(f for f in FAMILIES if f.name == "gemma")
    tok = build_family_tokenizer(tmp_path / "gemma", gemma)
    with caplog.at_level(logging.WARNING, logger="steps.chat"):
        assert end_of_turn_token_id(tok) == tok.convert_tokens_to_ids("<end_of_turn>")
    assert any("<end_of_turn>" in r.getMessage() and "generation_config" in r.getMessage() for r in caplog.records)
    fixed = build_family_tokenizer(tmp_path / "gemma2", gemma, generation_eos=("<eos>", "<end_of_turn>"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="steps.chat"):
        assert stop_token_ids(fixed) == ids_of(fixed, ["<end_of_turn>", "<eos>"])
    assert not caplog.records


def test_explicit_generation_config_adds_stop_ids(family_tokenizers):
    from transformers import GenerationConfig

    tok = family_tokenizers["llama3"]
    eot, eos, header = ids_of(tok, ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"])
    config = GenerationConfig(eos_token_id=[eos, header])
    assert stop_token_ids(tok, config) == [eot, eos, header]
    assert stop_token_ids(tok, {"eos_token_id": header}) == [eot, header, eos]
    assert decode_response(tok, [tok.convert_tokens_to_ids("x"), header, 5], config) == "x"
    assert stop_token_ids(tok) == [eot, eos]  # the file beside the tokenizer again


HEADER_ONLY_TEMPLATE = (  # turns are opened by a role token but nothing closes them
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CLOSED_ONLY_BETWEEN_TURNS = (  # the end token is written only when another turn follows
    "{% for m in messages %}{% if not loop.first %}<|end|>{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|end|><|assistant|>\n{% endif %}"
)
PLAIN_TEXT_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}### assistant:\n"


@pytest.mark.parametrize(
    ("template", "generation_eos", "expected"),
    [
        (HEADER_ONLY_TEMPLATE, ("<|endoftext|>",), "<|endoftext|>"),  # not the <|user|> header of the next turn
        (CLOSED_ONLY_BETWEEN_TURNS, ("<|endoftext|>",), "<|end|>"),
        (PLAIN_TEXT_TEMPLATE, ("<|endoftext|>",), "<|endoftext|>"),  # generation config's eos
        (PLAIN_TEXT_TEMPLATE, (), "</s>"),  # no generation config ids: the tokenizer's eos
    ],
    ids=["header-only", "closed-between-turns", "plain-text", "plain-text-no-generation-config"],
)
def test_templates_without_a_closing_token_fall_back(tmp_path, template, generation_eos, expected):
    family = Family(
        "custom",
        template,
        {"bos": None, "eos": "</s>", "unk": "<unk>", "pad": None},
        ("<|assistant|>", "<|user|>", "<|end|>"),
        generation_eos,
        "",
        expected,
        (),
        "",
    )
    tok = build_family_tokenizer(tmp_path / "custom", family)
    assert end_of_turn_token_id(tok) == tok.convert_tokens_to_ids(expected)


def test_unreadable_generation_config_names_the_file(tmp_path, family_tokenizers):
    bad = tmp_path / "generation_config.json"
    bad.write_text("{not json")
    with pytest.raises(ChatFormatError, match=r"generation_config\.json"):
        stop_token_ids(family_tokenizers["phi3"], bad)
    bad.write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ChatFormatError, match="eos_token_id"):
        stop_token_ids(family_tokenizers["phi3"], bad)
