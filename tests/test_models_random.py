"""``random:<dir>`` models and the repository's tokenizer (configs/models): specs resolve, configs are checked with
errors that name the file and field, the models have the shapes of Llama 3.2 1B and of a Llama 3.1 8B slice, the
init is seeded, and the tokenizer is a Llama-3-style chat tokenizer that ships in the repository and regenerates."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from steps.chat import encode_prompt_response, end_of_turn_token_id, render_prompt, stop_token_ids
from steps.models import ModelSource, ModelSpecError, load_model, load_tokenizer, resolve_model_spec
from steps.models.bpe_tokenizer import REPO_DIR, SPECIAL_TOKENS, tokenizer_files
from steps.models.random_init import llama_config, read_random_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "models"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 1408}  # fmt: skip


def tiny_spec(name: str = "llama3.2-1b", **extra: object) -> str:
    return f"random:{name}:{json.dumps({**TINY, **extra})}"


def llama_parameters(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                     intermediate: int, tied: bool) -> int:  # fmt: skip
    """Parameters of a Llama decoder from its shapes (q, k, v, o; gate, up, down; two norms a layer; final norm)."""
    attention = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("random:llama3.2-1b")


# ------------------------------------------------------------------------------------------------ spec resolution


def test_random_specs_resolve_to_the_repository_configs():
    assert resolve_model_spec("random:llama3.2-1b") == ModelSource("random", str(CONFIGS / "llama3.2-1b"))
    by_path = resolve_model_spec(f"random:{CONFIGS / 'llama3.1-8b-slice'}")
    assert by_path == ModelSource("random", str(CONFIGS / "llama3.1-8b-slice"))
    with_overrides = resolve_model_spec('random:llama3.2-1b:{"num_hidden_layers": 2, "hidden_size": 64}')
    assert with_overrides.tiny_overrides == (("hidden_size", 64), ("num_hidden_layers", 2))


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("random:", "name a directory"),
        ("random:no-such-config", "llama3.1-8b-slice, llama3.2-1b"),
        ("random:./no/such/dir", "is not a directory"),
        ("random:llama3.2-1b:{oops", "JSON object"),
        ("random:llama3.2-1b:{}", None),
    ],
)
def test_bad_random_specs_name_the_problem(spec, fragment):
    if fragment is None:  # an empty override object is fine
        assert resolve_model_spec(spec).tiny_overrides == ()
        return
    with pytest.raises(ModelSpecError, match="random") as err:
        resolve_model_spec(spec)
    assert fragment in str(err.value)


def _config_dir(tmp_path: Path, **changes: object) -> Path:
    """A copy of the 1B config with fields changed (None removes one), its tokenizer path made absolute."""
    raw = json.loads((CONFIGS / "llama3.2-1b" / "config.json").read_text())
    raw["prefflow"]["tokenizer"] = str(CONFIGS / "prefflow-bpe")
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(raw))
    return target


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"prefflow": None}, ["prefflow.tokenizer", "missing"]),
        ({"prefflow": {"tokenizer": "/nowhere"}}, ["prefflow.tokenizer", "lacks tokenizer.json"]),
        ({"hidden_size": None}, ["hidden_size", "positive integer"]),
        ({"num_hidden_layers": 0}, ["num_hidden_layers", "positive integer"]),
        ({"model_type": "mistral"}, ["model_type", "llama"]),
        ({"eos_token_id": 3}, ["eos_token_id", "set from the tokenizer"]),
        ({"vocab_size": 100}, ["vocab_size", "smaller than the tokenizer's", "use vocab_size >="]),
    ],
)
def test_bad_configs_name_file_field_and_fix(tmp_path, changes, fragments):
    directory = _config_dir(tmp_path, **changes)
    with pytest.raises(ModelSpecError) as err:
        load_model(f"random:{directory}")
    message = str(err.value)
    assert str(directory / "config.json") in message
    for fragment in fragments:
        assert fragment in message


def test_a_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match=r"has no config\.json"):
        resolve_model_spec(f"random:{tmp_path}")


# ---------------------------------------------------------------------------------------------- model shapes


@pytest.mark.parametrize(
    "name, shape, tied, rope_factor, expected",
    [
        # Llama 3.2 1B: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, tied
        ("llama3.2-1b", (2048, 16, 32, 8, 64, 8192), True, 32.0, 1_235_814_400),
        # Llama 3.1 8B widths, 2 of its 32 layers, untied
        ("llama3.1-8b-slice", (4096, 2, 32, 8, 128, 14336), False, 8.0, 1_486_901_248),
    ],
)
def test_configs_build_llama3_shapes(tokenizer, name, shape, tied, rope_factor, expected):
    config = llama_config(read_random_config(resolve_model_spec(f"random:{name}")), tokenizer, None)
    hidden, layers, heads, kv_heads, head_dim, intermediate = shape
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (kv_heads, head_dim, intermediate)
    assert config.vocab_size == 128_256 > len(tokenizer) and config.tie_word_embeddings is tied
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == rope_factor and rope["rope_theta"] == 500_000.0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )  # fmt: skip
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # shapes only: the full-size init belongs on a GPU
        model = LlamaForCausalLM(config)
    count = llama_parameters(128_256, hidden, layers, heads, kv_heads, head_dim, intermediate, tied)
    assert count == expected == sum(p.numel() for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied


def test_random_init_is_seeded_and_keeps_the_global_rng(tokenizer):
    rng_before = torch.get_rng_state()
    a, b, c = load_model(tiny_spec(), seed=0), load_model(tiny_spec(), seed=0), load_model(tiny_spec(), seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert a.config.vocab_size == 1408 and a.lm_head.weight is a.model.embed_tokens.weight
    std = float(a.model.layers[0].mlp.up_proj.weight.detach().std())
    assert abs(std - 0.02) < 0.002  # initializer_range of the config
    count = llama_parameters(1408, 32, 1, 2, 1, 16, 64, tied=True)
    assert sum(p.numel() for p in a.parameters()) == count


def test_random_model_scores_near_uniform_over_its_vocabulary(tokenizer):
    """A small random init spreads probability almost evenly: mean log p(token) is about -ln(vocab)."""
    model = load_model(tiny_spec(), dtype="float32")
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])
    assert float(logp.mean()) == pytest.approx(-math.log(1408), abs=0.05)


def test_model_vocabulary_smaller_than_the_tokenizer_is_refused():
    with pytest.raises(ModelSpecError, match="vocab_size"):
        load_model(tiny_spec(vocab_size=512))


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_a_chat(tokenizer):
    messages = [{"role": "user", "content": "How do I reverse a list in Python?"}]
    reply = "Use slicing: `items[::-1]` returns a reversed copy; déjà vu 42 ✓."
    prompt_ids, response_ids = encode_prompt_response(tokenizer, messages, reply)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_token_id(tokenizer) == eot == response_ids[-1] and stop_token_ids(tokenizer) == [eot]
    assert render_prompt(tokenizer, messages) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow do I reverse a list in Python?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
    whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    assert tokenizer(whole, add_special_tokens=False)["input_ids"] == prompt_ids + response_ids
    assert tokenizer.decode(response_ids[:-1]) == reply  # byte-level: every character comes back
    assert tokenizer.decode(prompt_ids + response_ids) == whole
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>" and tokenizer.pad_token_id != eot
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_tokenizer_ships_small_and_regenerates_byte_for_byte():
    committed = {p.name: p.read_bytes() for p in (REPO / REPO_DIR).iterdir()}
    assert sorted(committed) == ["tokenizer.json", "tokenizer_config.json"]
    assert sum(len(b) for b in committed.values()) < 256 * 1024
    assert tokenizer_files() == committed


def test_regenerated_tokenizer_loads_from_any_directory(tmp_path):
    shutil.copytree(REPO / REPO_DIR, tmp_path / "tok")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.chat_template and loaded.eos_token == "<|eot_id|>" and loaded.bos_token == "<|begin_of_text|>"
