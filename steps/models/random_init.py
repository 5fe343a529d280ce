"""``random:<dir>`` models: a Llama built from a config.json in the repository (or any directory) and initialised
from a seed, with the tokenizer its ``prefflow`` block names. No weights, no cache, no network: what a bare GPU node
needs to run the real training path at real sizes (``configs/models/README.md`` lists the configs).

The init runs on the CUDA GPU when one is visible (a 1B model takes minutes to initialise on a CPU, milliseconds on
a GPU) and on the CPU otherwise, so the weights depend on the seed and on that; every rank of a job and every load in
a process on the same machine gets the same weights. The global RNG (CPU and that GPU's) is left as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.models.specs import RANDOM_CONFIG_FILE, ModelSource, ModelSpecError

if TYPE_CHECKING:  # heavy imports stay inside functions: each Metaflow step is a fresh process
    import torch
    from transformers import PreTrainedModel

#: The config.json block PrefFlow reads (LlamaConfig never sees it).
PREFFLOW_BLOCK = "prefflow"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: Shape fields every random-init config must give (positive integers); the rest default as LlamaConfig does.
REQUIRED_SHAPE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
#: Set from the tokenizer, never from the config (a mismatch would end turns or pad with the wrong token).
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class RandomModelConfig:
    """A random-init model directory, read and checked: LlamaConfig fields (overrides applied) and the tokenizer."""

    directory: Path
    fields: dict[str, Any]
    tokenizer_dir: Path

    @property
    def config_path(self) -> Path:
        return self.directory / RANDOM_CONFIG_FILE


def _fail(path: Path, field: str, problem: str, fix: str) -> ModelSpecError:
    return ModelSpecError(f"{path}: {field}: {problem}; {fix}")


def _tokenizer_dir(path: Path, block: Any) -> Path:
    fix = f'add "{PREFFLOW_BLOCK}": {{"tokenizer": "<directory with {" and ".join(TOKENIZER_FILES)}>"}}'
    if not isinstance(block, dict) or not isinstance(block.get("tokenizer"), str) or not block["tokenizer"].strip():
        raise _fail(path, f"{PREFFLOW_BLOCK}.tokenizer", "missing or not a string", fix + " (relative to the file)")
    where = (path.parent / Path(block["tokenizer"]).expanduser()).resolve()
    missing = [name for name in TOKENIZER_FILES if not (where / name).is_file()]
    if missing:
        raise _fail(
            path,
            f"{PREFFLOW_BLOCK}.tokenizer",
            f"{where} lacks {', '.join(missing)}",
            "point it at a tokenizer directory (e.g. ../prefflow-bpe; python -m steps.models.bpe_tokenizer writes it)",
        )
    return where


def read_random_config(source: ModelSource) -> RandomModelConfig:
    """The directory's config.json with the spec's overrides, checked; ModelSpecError naming file, field and fix."""
    directory = Path(source.location)
    path = directory / RANDOM_CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"{path}: cannot read a JSON object ({exc}); fix the file") from exc
    if not isinstance(raw, dict):
        raise _fail(path, "(top level)", f"a JSON {type(raw).__name__}", "write a JSON object of LlamaConfig fields")
    tokenizer_dir = _tokenizer_dir(path, raw.pop(PREFFLOW_BLOCK, None))
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise _fail(path, "model_type", f"{model_type!r}", 'random-init models are Llama: set "model_type": "llama"')
    overrides = dict(source.tiny_overrides)
    if PREFFLOW_BLOCK in overrides:
        raise ModelSpecError(
            f"random spec overrides for {path}: {PREFFLOW_BLOCK!r} cannot be overridden; edit the file"
        )
    fields = {**raw, **overrides}
    for name in TOKEN_ID_FIELDS:
        if name in fields:
            where = "the spec's overrides" if name in overrides else str(path)
            raise ModelSpecError(f"{where}: {name}: set from the tokenizer ({tokenizer_dir}); remove it")
    for name in REQUIRED_SHAPE:
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(path, name, f"{value!r} (after overrides {overrides or '{}'})", "give a positive integer")
    return RandomModelConfig(directory, fields, tokenizer_dir)


def random_tokenizer_dir(source: ModelSource) -> Path:
    """The tokenizer directory a random-init model's config names."""
    return read_random_config(source).tokenizer_dir


def llama_config(config: RandomModelConfig, tokenizer: Any, attn_implementation: str | None) -> Any:
    """The LlamaConfig: the file's fields, the tokenizer's special ids, dropout 0; the vocabulary must hold the
    tokenizer's ids (it may be larger: Llama 3's 128,256 rows with a smaller tokenizer)."""
    from transformers import LlamaConfig

    vocab = config.fields["vocab_size"]
    if len(tokenizer) > vocab:
        raise _fail(
            config.config_path,
            "vocab_size",
            f"{vocab} is smaller than the tokenizer's {len(tokenizer)} tokens ({config.tokenizer_dir})",
            f"use vocab_size >= {len(tokenizer)}",
        )
    settings: dict[str, Any] = {
        **config.fields,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "attention_dropout": 0.0,
    }
    settings.pop("architectures", None)
    settings.pop("model_type", None)
    if attn_implementation is not None:
        settings["attn_implementation"] = attn_implementation
    try:
        return LlamaConfig(**settings)
    except Exception as exc:  # TypeError/ValueError, or huggingface_hub's strict-dataclass validation error
        raise ModelSpecError(
            f"{config.config_path}: LlamaConfig rejected the fields (overrides applied): {exc}"
        ) from exc


def init_device() -> torch.device:
    """Where random weights are drawn: this process's current CUDA GPU when one is visible, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def random_model(source: ModelSource, seed: int, attn_implementation: str | None) -> PreTrainedModel:
    """The Llama of a ``random`` source in fp32, initialised from ``seed`` (see the module doc for where)."""
    import torch
    from transformers import LlamaForCausalLM

    from steps.models.tokenizers import load_tokenizer

    config = read_random_config(source)
    tokenizer = load_tokenizer(f"random:{config.directory}")
    llama = llama_config(config, tokenizer, attn_implementation)
    device = init_device()
    forked = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)  # the current device only; the others' states are not touched
        model = LlamaForCausalLM(llama).float()
    return model.eval()
