"""The tokenizer that ships in the repository (``configs/models/prefflow-bpe``): a small byte-level BPE with Llama-3's
special tokens and chat format, trained on the project's own embedded OpenAssistant-style sample.

Why: a GPU node without network or model cache still needs a real tokenizer for random-init models (``random:``
specs), one that ``steps.chat`` treats like a Llama-3 instruct tokenizer. ``python -m steps.models.bpe_tokenizer``
regenerates the two files; with the same ``tokenizers`` version the bytes are identical (a test checks it).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from steps.io import atomic_write_files

logger = logging.getLogger(__name__)

#: Where the committed files live, relative to the repository root.
REPO_DIR = Path("configs") / "models" / "prefflow-bpe"
VOCAB_SIZE = 4096  # an upper bound: the 12k-character corpus runs out of pairs seen twice before it
MIN_FREQUENCY = 2

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"  # Llama 3.1's padding token: never the end of a turn
#: Ids 0..5, in this order.
SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TEXT, HEADER_START, HEADER_END, END_OF_TURN, PAD)

#: Llama 3's pre-tokenizer split (contractions, letters with one leading non-letter, numbers in groups of up to 3,
#: punctuation runs, newline runs, other whitespace), before byte-level mapping.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

#: Llama-3 instruct format: BOS, then ``<|start_header_id|>role<|end_header_id|>\n\n content<|eot_id|>`` per turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def corpus() -> Iterator[str]:
    """Every message text of the embedded sample (depth first, file order), then the embedded eval instructions."""
    sample = resources.files("steps.data").joinpath("embedded/oasst2_sample.trees.jsonl").read_text("utf-8")

    def walk(node: dict[str, Any]) -> Iterator[str]:
        yield node["text"]
        for reply in node.get("replies") or []:
            yield from walk(reply)

    for line in sample.splitlines():
        if line.strip():
            yield from walk(json.loads(line)["prompt"])
    evals = json.loads(resources.files("steps.evaluate").joinpath("embedded_eval_set.json").read_text("utf-8"))
    for item in evals:
        yield item["instruction"]


def build_tokenizer() -> Any:
    """Train the BPE (deterministic: byte alphabet sorted, merges by count then by pair) and wire its specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus()), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A:0",
        pair=f"{BEGIN_OF_TEXT} $A:0 {BEGIN_OF_TEXT}:1 $B:1",
        special_tokens=[(BEGIN_OF_TEXT, SPECIAL_TOKENS.index(BEGIN_OF_TEXT))],
    )
    return tokenizer


def tokenizer_config() -> dict[str, Any]:
    """``tokenizer_config.json``: the fast tokenizer class, the special tokens' roles and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": END_OF_TURN,  # the instruct convention: generation stops at the end of the turn
        "pad_token": PAD,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }


def tokenizer_files() -> dict[str, bytes]:
    """The two files' names and bytes."""
    tokenizer = build_tokenizer()
    return {
        "tokenizer.json": (tokenizer.to_str(pretty=True) + "\n").encode("utf-8"),
        "tokenizer_config.json": (json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
    }


def write_tokenizer(out_dir: str | Path) -> list[Path]:
    """Write both files into ``out_dir`` (each through a temporary file, renamed into place)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = atomic_write_files({out / name: data for name, data in tokenizer_files().items()})
    for path in written:
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(REPO_DIR), help=f"directory to write into (default {REPO_DIR})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tokenizer(args.out)


if __name__ == "__main__":
    main()
