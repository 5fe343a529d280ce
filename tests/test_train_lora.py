"""Adapters: the adapters-disabled live reference, adapter directories handed on and reloaded, QLoRA's CPU errors
and config rules, and DPO with LoRA through the real flow as the README shows it."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch

from steps.config import ConfigError, LoraConfig, PreferenceConfig, config_from_dict, load_config
from steps.io import write_jsonl
from steps.losses import build_loss
from steps.models import load_model, load_tokenizer
from steps.models.load import (
    FourBit,
    QuantizationUnavailableError,
    adapter_base,
    four_bit_kwargs,
    is_adapter_dir,
)
from steps.models.specs import ModelSpecError
from steps.train.batching import collate_pairs, tokenize_pairs
from steps.train.logprobs import sequence_logprobs
from steps.train.loop import train
from steps.train.objectives import PreferenceObjective
from steps.train.reference import References
from tests.faults import stop_after_checkpoint

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["apples", "rivers", "music", "trains", "gardens", "books", "clouds", "bridges", "coffee", "maps"]
DEV_TOPICS = ["kites", "pianos", "tigers", "castles"]
LORA: dict = {"enabled": True, "r": 4, "alpha": 8}


def readme_yaml(first_line: str) -> str:
    """The README's ```yaml block that starts with ``first_line``: the tests run the files users copy."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README.md: expected one ```yaml block starting {first_line!r}, found {len(found)}"
    return found[0]


# The README's "Adapters (LoRA and QLoRA)" section: its two config files, as shown there.
README_LORA_YAML = readme_yaml("# lora_dpo.yaml:")
README_QLORA_YAML = readme_yaml("# qlora_8b.yaml:")


def pair_rows(topics: list[str], prefix: str = "p") -> list[dict]:
    return [
        {
            "id": f"{prefix}{i}",
            "prompt": [{"role": "user", "content": f"Describe {t}."}],
            "chosen": f"{t.capitalize()} are wonderful and helpful.",
            "rejected": f"{t.capitalize()} are terrible and useless.",
        }
        for i, t in enumerate(topics)
    ]


def sft_rows(topics: list[str]) -> list[dict]:
    return [
        {
            "id": f"s{i}",
            "prompt": [{"role": "user", "content": f"Tell me about {t}."}],
            "response": f"{t.capitalize()} are wonderful, and people enjoy them every day.",
        }
        for i, t in enumerate(topics)
    ]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_jsonl(root / "preference.train.jsonl", pair_rows(TOPICS))
    write_jsonl(root / "preference.dev.jsonl", pair_rows(DEV_TOPICS, "d"))
    write_jsonl(root / "sft.train.jsonl", sft_rows(TOPICS))
    write_jsonl(root / "sft.dev.jsonl", sft_rows(DEV_TOPICS))
    return root


def run_cfg(preference: dict | None = None, sft: dict | None = None):
    common = {"lr": 5e-3, "max_steps": 3, "max_seq_len": 128, "max_num_tokens": 512, "seed": 3}
    return config_from_dict(
        {
            "model": {"base": "tiny", "dtype": "float32"},
            "sft": {**common, **(sft or {})},
            "preference": {"criterion": "dpo", "init": "base", **common, **(preference or {})},
        }
    )


def batches(tokenizer, rows: list[dict]) -> dict[str, object]:
    pairs, _ = tokenize_pairs(rows, tokenizer, 128)
    return {
        "separate": collate_pairs(pairs, tokenizer.pad_token_id, share_prompt=False),
        "shared_prompt": collate_pairs(pairs, tokenizer.pad_token_id, share_prompt=True),
    }


def logprobs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(model, batch)[0]


def count_loads(caplog) -> int:
    """Models built or read from disk (load_model logs one 'loaded ...' line per model it puts in memory)."""
    return sum(1 for r in caplog.records if r.name == "steps.models.load" and r.getMessage().startswith("loaded "))


# --- the adapters-disabled reference -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["separate", "shared_prompt"])
def test_adapters_disabled_reference_is_the_frozen_base_exactly(tokenizer, tmp_path, layout):
    """Train LoRA adapters for real, then ask the objective for reference log-probs: the base's, bit for bit."""
    from steps.train.recipes import apply_lora

    cfg = PreferenceConfig(lr=2e-2, max_num_tokens=512, max_steps=3, seed=3, lora=LoraConfig(**LORA))
    pairs, _ = tokenize_pairs(pair_rows(TOPICS), tokenizer, 128)
    objective = PreferenceObjective(
        pairs, [], tokenizer.pad_token_id, cfg, build_loss("dpo", beta=0.1), True, References(from_policy=True)
    )
    policy = apply_lora(load_model("tiny", seed=7), cfg)
    result = train(policy, objective, cfg, tmp_path, resume=False)
    batch = batches(tokenizer, pair_rows(DEV_TOPICS, "d"))[layout]
    n = batch.extra["num_pairs"]

    trained = logprobs(result.model, batch)
    ref_chosen, ref_rejected = objective.reference_logprobs(result.model, batch)
    fresh_base = logprobs(load_model("tiny", seed=7), batch)  # loaded anew: no weight shared with the policy
    assert torch.equal(ref_chosen, fresh_base[:n]) and torch.equal(ref_rejected, fresh_base[n:])
    assert not torch.allclose(trained, fresh_base, atol=1e-3)  # the adapters did move the policy
    assert torch.equal(logprobs(result.model, batch), trained)  # and are back on after the reference pass
    assert not ref_chosen.requires_grad


def test_live_reference_with_lora_loads_one_model_and_matches_precompute(tokenizer, data_dir, tmp_path, caplog):
    from steps.train.recipes import run_preference

    caplog.set_level(logging.INFO, logger="steps.models.load")
    histories, loads = {}, {}
    for name, pref in {
        "live_lora": {"reference_mode": "live", "lora": LORA},
        "precompute_lora": {"reference_mode": "precompute", "lora": LORA},
        "live_full": {"reference_mode": "live"},
    }.items():
        caplog.clear()
        summary = run_preference(run_cfg(pref), "dpo", data_dir, tmp_path / name)
        loads[name] = count_loads(caplog)
        histories[name] = [h["loss"] for h in summary.history]
    assert loads == {"live_lora": 1, "precompute_lora": 1, "live_full": 2}
    assert histories["live_lora"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    # the same run with the reference scored up front by the untouched init model: the same losses
    assert histories["live_lora"] == pytest.approx(histories["precompute_lora"], rel=1e-5, abs=1e-6)


def test_live_reference_from_another_model_is_loaded(tokenizer, data_dir, tmp_path, caplog):
    """reference != init: the adapters-disabled policy is not the reference, so the reference is loaded."""
    from steps.train.recipes import run_preference

    caplog.set_level(logging.INFO, logger="steps.models.load")
    cfg = run_cfg({"reference_mode": "live", "reference": "tiny:{}", "lora": LORA})
    run_preference(cfg, "dpo", data_dir, tmp_path / "run")
    assert count_loads(caplog) == 2


# --- adapters handed on -------------------------------------------------------------------------------------


def test_adapter_directory_reloads_to_the_merged_models_logprobs(tokenizer, tmp_path):
    """A trained LoRA policy handed on both ways: the adapter directory (over a fresh base) and the merged
    directory reload to the in-memory policy's log-probs within fp32 tolerance."""
    from steps.train.adapters import save_adapter_dir
    from steps.train.checkpoints import save_model_dir
    from steps.train.recipes import apply_lora

    cfg = PreferenceConfig(lr=2e-2, max_num_tokens=512, max_steps=3, seed=3, lora=LoraConfig(**LORA))
    pairs, _ = tokenize_pairs(pair_rows(TOPICS), tokenizer, 128)
    objective = PreferenceObjective(
        pairs, [], tokenizer.pad_token_id, cfg, build_loss("dpo", beta=0.1), True, References(from_policy=True)
    )
    result = train(apply_lora(load_model("tiny"), cfg), objective, cfg, tmp_path / "run")
    policy = result.model.lm  # the peft model inside the training root
    batch = batches(tokenizer, pair_rows(DEV_TOPICS, "d"))["separate"]
    in_memory = logprobs(policy, batch)
    adapter_dir = save_adapter_dir(policy, tokenizer, tmp_path / "adapter", "tiny")
    merged_dir = save_model_dir(policy, tokenizer, tmp_path / "merged")
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (merged_dir / "model.safetensors").stat().st_size / 20  # the adapter alone
    from_adapter = logprobs(load_model(str(adapter_dir)), batch)
    from_merged = logprobs(load_model(str(merged_dir)), batch)
    torch.testing.assert_close(from_adapter, from_merged, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(from_adapter, in_memory, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(from_adapter, logprobs(load_model("tiny"), batch), atol=1e-3)  # trained


def test_hand_on_adapter_round_trip(tokenizer, data_dir, tmp_path):
    """SFT hands on its adapter, DPO trains a new one over it (live reference = the SFT model): both directories
    reload to the log-probs of their merged models, and the DPO run's reference equals the SFT model."""
    from steps.train.recipes import run_preference, run_sft

    adapter = {**LORA, "hand_on": "adapter"}
    cfg = run_cfg({"reference_mode": "live", "lora": adapter, "init": "sft"}, sft={"lora": adapter})
    sft = run_sft(cfg, data_dir, tmp_path / "sft")
    sft_dir = Path(sft.model_dir)
    files = {p.name for p in sft_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files and "README.md" in files  # the adapter alone, with its card
    assert is_adapter_dir(sft_dir) and adapter_base(sft_dir) == "tiny"

    batch = batches(tokenizer, pair_rows(DEV_TOPICS, "d"))["separate"]
    base = load_model("tiny")
    sft_in_memory = peft.PeftModel.from_pretrained(base, str(sft_dir)).merge_and_unload()
    reloaded = load_model(str(sft_dir))  # base + adapter, merged
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logprobs(reloaded, batch), logprobs(sft_in_memory, batch), rtol=1e-6, atol=1e-5)
    assert not torch.allclose(logprobs(reloaded, batch), logprobs(load_model("tiny"), batch), atol=1e-3)
    assert load_tokenizer(str(sft_dir)).pad_token == load_tokenizer("tiny").pad_token

    dpo = run_preference(cfg, "dpo", data_dir, tmp_path / "dpo", sft_model_dir=str(sft_dir))
    dpo_dir = Path(dpo.model_dir)
    assert adapter_base(dpo_dir) == str(sft_dir.resolve()) and dpo.reference == str(sft_dir)
    assert dpo.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the SFT model
    # the DPO adapter over the merged SFT model, merged again: what load_model gives for the DPO directory
    by_hand = peft.PeftModel.from_pretrained(load_model(str(sft_dir)), str(dpo_dir)).merge_and_unload()
    torch.testing.assert_close(logprobs(load_model(str(dpo_dir)), batch), logprobs(by_hand, batch))
    merged_dpo = load_model(str(dpo_dir))
    assert not torch.allclose(logprobs(merged_dpo, batch), logprobs(reloaded, batch), atol=1e-4)


def test_an_adapter_kept_separate_trains_further_and_points_at_its_own_base(tokenizer, tmp_path):
    """What a 4-bit base forces (an adapter that cannot be merged), on CPU: the init adapter keeps training, it is
    not its own reference with adapters off, and the adapter handed on points at the original base."""
    from steps.train.adapters import hand_on_base, reference_is_policy_base, save_adapter_dir
    from steps.train.recipes import apply_lora

    cfg = PreferenceConfig(lora=LoraConfig(**LORA))
    first = apply_lora(load_model("tiny"), cfg)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    saved = save_adapter_dir(first, tokenizer, tmp_path / "first", "tiny")
    kept = load_model(str(saved), merge_adapter=False)
    assert hasattr(kept, "peft_config") and not any(p.requires_grad for p in kept.parameters())
    policy = apply_lora(kept, cfg)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not reference_is_policy_base(cfg.lora, str(saved), str(saved), kept)
    assert hand_on_base(str(saved), kept) == "tiny"  # not the first adapter's directory: no double counting
    batch = batches(tokenizer, pair_rows(DEV_TOPICS, "d"))["separate"]
    torch.testing.assert_close(logprobs(policy, batch), logprobs(load_model(str(saved)), batch))


def test_adapter_directory_without_a_base_says_what_to_set(tokenizer, tmp_path):
    from steps.train.adapters import save_adapter_dir
    from steps.train.recipes import apply_lora

    policy = apply_lora(load_model("tiny"), PreferenceConfig(lora=LoraConfig(**LORA)))
    saved = save_adapter_dir(policy, None, tmp_path / "a", "tiny")
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ModelSpecError, match="base_model_name_or_path"):
        load_model(str(saved))


# --- QLoRA ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a CUDA GPU")
@pytest.mark.parametrize("section", ["sft", "preference"])
def test_qlora_without_cuda_fails_at_the_start_of_the_step_naming_the_key(data_dir, tmp_path, section):
    from steps.train.recipes import run_preference, run_sft

    qlora = {**LORA, "load_in_4bit": True, "hand_on": "adapter"}
    cfg = run_cfg(**{section: {"lora": qlora}})
    with pytest.raises(QuantizationUnavailableError) as err:
        if section == "sft":
            run_sft(cfg, data_dir, tmp_path / "out")
        else:
            run_preference(cfg, "dpo", data_dir, tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{section}.lora.load_in_4bit: ")
    assert "CUDA GPU" in message and "bitsandbytes" in message and f"{section}.lora.load_in_4bit: false" in message
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a CUDA GPU")
def test_load_model_in_4_bits_on_cpu_is_refused():
    with pytest.raises(QuantizationUnavailableError, match="CUDA GPU"):
        load_model("tiny", four_bit=FourBit())


class QuantStatsLinear(torch.nn.Linear):
    """bitsandbytes' Linear4bit state-dict layout only (bitsandbytes needs CUDA): its quantization statistics
    under ``weight.<name>`` keys, as ``Linear4bit._save_to_state_dict`` writes them. Nothing else is imitated."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key in ("absmax", "quant_map", "nested_absmax", "quant_state.bitsandbytes__nf4"):
            destination[prefix + "weight." + key] = torch.zeros(2)


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
def test_checkpoints_over_a_base_with_quantization_statistics(tokenizer, tmp_path, prepared):
    """The trainer's DCP checkpoints resolve every state-dict key as an attribute path: the 4-bit statistics
    keys break them unless the base is prepared as prepare_four_bit does; prepared, the checkpoint holds the
    adapter only and a resumed run ends on the same adapter weights as an uninterrupted one."""
    from torch.distributed.checkpoint import FileSystemReader

    from steps.config import SFTConfig
    from steps.train.adapters import keep_parameters_only
    from steps.train.batching import tokenize_sft
    from steps.train.checkpoints import latest_checkpoint
    from steps.train.objectives import SFTObjective
    from steps.train.recipes import apply_lora

    examples, _ = tokenize_sft(sft_rows(TOPICS), tokenizer, 128)
    lora = LoraConfig(**LORA)
    cfg = SFTConfig(lr=1e-2, max_num_tokens=256, seed=4, checkpoint_every_steps=1, dev_every_epoch=False, lora=lora)

    def policy():
        base = load_model("tiny", seed=5).requires_grad_(False)
        for layer in base.model.layers:
            layer.self_attn.q_proj.__class__ = QuantStatsLinear
        if prepared:
            keep_parameters_only(base)
        return apply_lora(base, cfg)

    def run(out):
        return train(policy(), SFTObjective(examples, [], tokenizer.pad_token_id, cfg), cfg, out)

    if not prepared:
        with pytest.raises(AttributeError, match="absmax"):
            run(tmp_path / "a")
        return
    whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt), stop_after_checkpoint(1):
        run(tmp_path / "b")
    resumed = run(tmp_path / "b")
    assert resumed.resumed_from is not None
    latest = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert latest is not None
    saved = list(FileSystemReader(str(latest / "state")).read_metadata().state_dict_metadata)
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys  # no base weights, no statistics
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    lora_keys = [k for k in a if "lora_" in k]
    assert lora_keys and all(torch.equal(a[k], b[k]) for k in lora_keys)


@pytest.mark.parametrize("quant_type,compute", [("nf4", torch.bfloat16), ("fp4", torch.float32)])
def test_four_bit_settings_reach_bitsandbytes_config(quant_type, compute):
    kwargs = four_bit_kwargs(FourBit(quant_type, compute), "cuda:1")
    bnb = kwargs["quantization_config"]
    assert (bnb.load_in_4bit, bnb.load_in_8bit, bnb.bnb_4bit_quant_type) == (True, False, quant_type)
    assert bnb.bnb_4bit_compute_dtype == compute
    assert kwargs["device_map"] == {"": torch.device("cuda", 1)}


def test_qlora_loads_the_base_in_4_bits_computing_in_model_dtype():
    from steps.train.adapters import four_bit_of
    from steps.train.precision import resolve_precision

    cfg = config_from_dict(_yaml(README_QLORA_YAML))
    precision = resolve_precision(cfg.model.dtype, cfg.model.master_dtype, torch.device("cuda"))
    assert four_bit_of(cfg.sft.lora, precision) == FourBit("nf4", torch.bfloat16)
    assert four_bit_of(LoraConfig(enabled=True), precision) is None


def _yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


@pytest.mark.parametrize(
    "lora,key,words",
    [
        ({"load_in_4bit": True, "hand_on": "adapter"}, "sft.lora.load_in_4bit", "enabled is false"),
        ({"hand_on": "adapter"}, "sft.lora.hand_on", "enabled is false"),
        ({"enabled": True, "load_in_4bit": True}, "sft.lora.hand_on", "cannot be merged"),
        (
            {"enabled": True, "load_in_4bit": True, "hand_on": "adapter", "bnb_4bit_quant_type": "int4"},
            "sft.lora.bnb_4bit_quant_type",
            "allowed",
        ),
        ({"enabled": True, "hand_on": "both"}, "sft.lora.hand_on", "allowed"),
        ({"enabled": True, "r": 0}, "sft.lora.r", ">= 1"),
        ({"enabled": True, "dropout": 1.0}, "sft.lora.dropout", "[0, 1)"),
        ({"enabled": True, "target_modules": []}, "sft.lora.target_modules", "at least one"),
    ],
)
def test_lora_config_rules(lora, key, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"sft": {"lora": lora}})
    assert err.value.key == key and words in err.value.message, str(err.value)


def test_qlora_with_fsdp_is_refused_at_config_load():
    qlora = {"enabled": True, "load_in_4bit": True, "hand_on": "adapter"}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"preference": {"parallelism": "fsdp", "lora": qlora}})
    assert err.value.key == "preference.parallelism" and "QLoRA" in err.value.message


@pytest.mark.parametrize("text", [README_LORA_YAML, README_QLORA_YAML], ids=["lora", "qlora"])
def test_readme_configs_load(tmp_path, text):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    cfg = load_config(path)
    for section in (cfg.sft, cfg.preference):
        assert section.lora.enabled and section.lora.hand_on == "adapter"
        assert section.lora.load_in_4bit == (text == README_QLORA_YAML)


# --- through the flow -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_with_lora_runs_through_the_flow_as_the_readme_shows(tmp_path, tokenizer):
    from metaflow import Runner, namespace

    (tmp_path / "lora_dpo.yaml").write_text(README_LORA_YAML)
    from tests.test_flow import _env

    env = _env(tmp_path)
    with Runner(
        str(REPO / "flows" / "pipeline.py"),
        show_output=False,
        env={**os.environ, **env},
        cwd=str(tmp_path),  # the config's output_dir (runs/) lands here, as in a user's checkout
        config=[("config", str(tmp_path / "lora_dpo.yaml"))],
    ).run(loss="dpo") as running:
        status, run, stderr = running.status, running.run, running.stderr
    assert status == "successful", stderr[-4000:]
    namespace(None)
    summaries = {t.data.variant["name"]: t.data.train_summary for t in run["preference"].tasks()}
    sft_dir, dpo_dir = Path(summaries["sft"].model_dir), Path(summaries["dpo"].model_dir)
    assert sft_dir.is_relative_to(tmp_path / "runs") and dpo_dir.is_relative_to(tmp_path / "runs")
    assert adapter_base(sft_dir) == "tiny" and adapter_base(dpo_dir) == str(sft_dir.resolve())
    for d in (sft_dir, dpo_dir):
        assert not (d / "model.safetensors").exists() and (d / "adapter_model.safetensors").exists()
    dpo_log = next(t.stdout for t in run["preference"].tasks() if t.data.variant["name"] == "dpo")
    assert "live reference = the policy with its adapters disabled" in dpo_log
    assert dpo_log.count("steps.models.load: loaded ") == 1, dpo_log  # one model in the DPO step: no reference copy
    dpo = summaries["dpo"]
    assert dpo.reference == str(sft_dir) and dpo.steps == len(dpo.history) >= 2
    assert dpo.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters-disabled reference
    results = {r.variant: r.evaluation for r in run["join"].task.data.results}
    assert set(results) == {"sft", "dpo"}
    for r in results.values():
        scores = r.alpaca_eval.scores
        assert scores.n_total == 3 and 0.0 <= scores.win_rate <= 100.0
        assert "| win rate |" in (Path(r.model_dir) / "README.md").read_text()
    assert results["dpo"].init == "SFT checkpoint"
