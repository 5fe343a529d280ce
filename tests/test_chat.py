"""steps.chat: prompt rendering, end-of-turn tokens and prompt/response encoding for ChatML and Llama-3."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from steps.chat import (
    ChatFormatError,
    decode_response,
    encode_prompt_response,
    end_of_turn_token_id,
    render_prompt,
    stop_token_ids,
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
