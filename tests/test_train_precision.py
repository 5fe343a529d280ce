"""Mixed precision on CPU (the same path as on GPU): fp32 master weights under bf16 autocast keep lr-1e-8 DPO
updates that bf16 weights lose; the flow's steps with ``model.dtype: bfloat16`` hand on a model that moved."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from steps.config import ConfigError, PreferenceConfig, config_from_dict
from steps.losses import build_loss
from steps.train import parallel
from steps.train.loop import train
from steps.train.objectives import PreferenceObjective, precompute_reference
from steps.train.precision import resolve_precision
from tests.test_train import TOPICS_DEV, TOPICS_TRAIN, pair_rows, pairs_from_rows

CPU = torch.device("cpu")


def _moved_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    assert set(before) <= set(after)
    changed = sum(int((before[k] != after[k].to(before[k].dtype)).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def _dpo_at_1e_8(tokenizer, tmp_path, compute: str, master: str):
    from steps.models import load_model

    precision = resolve_precision(compute, master, CPU)
    model = load_model("tiny", seed=4, dtype=master)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_pairs = pairs_from_rows(tokenizer, pair_rows(TOPICS_TRAIN))
    dev_pairs = pairs_from_rows(tokenizer, pair_rows(TOPICS_DEV))
    cfg = PreferenceConfig(lr=1e-8, final_lr=5e-9, max_num_tokens=400, seed=3)
    precompute_reference(model, train_pairs + dev_pairs, tokenizer.pad_token_id, cfg, precision=precision)
    loss = build_loss("dpo", beta=0.1)
    objective = PreferenceObjective(train_pairs, dev_pairs, tokenizer.pad_token_id, cfg, loss, True)
    result = train(model, objective, cfg, tmp_path / f"{compute}-{master}", precision=precision)
    return result, _moved_fraction(before, parallel.unwrap(result.model).state_dict())


def test_bf16_compute_with_fp32_master_weights_keeps_dpo_updates(tokenizer, tmp_path):
    mixed, moved = _dpo_at_1e_8(tokenizer, tmp_path, "bfloat16", "float32")
    assert mixed.extra["precision"] == "bfloat16 compute, float32 master weights (cpu)"
    assert moved >= 0.5, moved  # measured: 99.95 % of the entries
    assert all(p.dtype == torch.float32 for p in parallel.unwrap(mixed.model).parameters())
    # the contrast the issue measured: the same run with bf16 weights and AdamW state is (nearly) a no-op
    _, moved_bf16 = _dpo_at_1e_8(tokenizer, tmp_path, "bfloat16", "bfloat16")
    assert moved_bf16 < 0.01, moved_bf16  # measured: 0.02 %
    # the policy starts as its own reference in the same compute dtype: the first loss is exactly log 2
    assert mixed.history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_bf16_compute_tracks_fp32_compute(tokenizer, tmp_path):
    mixed, _ = _dpo_at_1e_8(tokenizer, tmp_path, "bfloat16", "float32")
    full, _ = _dpo_at_1e_8(tokenizer, tmp_path, "float32", "float32")
    assert full.extra["precision"] == "float32 (cpu)"
    assert len(mixed.history) == len(full.history) >= 3
    for a, b in zip(mixed.history, full.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)  # measured: <= 7e-5 apart
    assert mixed.dev_history[-1]["dev_loss"] == pytest.approx(full.dev_history[-1]["dev_loss"], abs=1e-3)


@pytest.mark.parametrize(("reference_compute", "starts_at_log2"), [("bfloat16", True), ("float32", False)])
def test_the_reference_is_scored_in_the_compute_dtype(tokenizer, tmp_path, reference_compute, starts_at_log2):
    """The policy before its first update is its own reference only when both are computed alike."""
    from steps.models import load_model

    model = load_model("tiny", seed=4)
    pairs = pairs_from_rows(tokenizer, pair_rows(TOPICS_TRAIN))
    cfg = PreferenceConfig(lr=1e-8, max_num_tokens=400, seed=3, max_steps=1, dev_every_epoch=False)
    reference = resolve_precision(reference_compute, "float32", CPU)
    precompute_reference(model, pairs, tokenizer.pad_token_id, cfg, precision=reference)
    objective = PreferenceObjective(pairs, [], tokenizer.pad_token_id, cfg, build_loss("dpo", beta=0.1), True)
    result = train(model, objective, cfg, tmp_path, precision=resolve_precision("bfloat16", "float32", CPU))
    gap = abs(result.history[0]["loss"] - math.log(2))
    assert (gap < 1e-6) == starts_at_log2, gap  # measured: 2e-9 alike, 7e-5 with an fp32 reference


def test_precision_resolution_and_its_config_rules(caplog):
    auto = resolve_precision("auto", "float32", CPU)
    assert (auto.compute, auto.master, auto.mixed) == (torch.float32, torch.float32, False)
    with caplog.at_level(logging.WARNING, logger="steps.train.precision"):
        bf16 = resolve_precision("auto", "bfloat16", CPU)  # never compute wider than the weights
    assert (bf16.compute, bf16.master) == (torch.bfloat16, torch.bfloat16)
    assert "master_dtype bfloat16" in caplog.text
    with pytest.raises(ValueError, match=r"wider than model\.master_dtype"):
        resolve_precision("float32", "bfloat16", CPU)
    with pytest.raises(ConfigError, match="loss scaling") as err:
        config_from_dict({"model": {"dtype": "float16"}})
    assert err.value.key == "model.dtype"
    with pytest.raises(ConfigError, match="more precisely than the weights") as err:
        config_from_dict({"model": {"dtype": "float32", "master_dtype": "bfloat16"}})
    assert err.value.key == "model.dtype"
    cfg = config_from_dict({"model": {"dtype": "bfloat16"}, "resources": {"process_group_timeout_s": 60}})
    assert (cfg.model.dtype, cfg.model.master_dtype, cfg.evaluation.dtype) == ("bfloat16", "float32", "auto")
    assert cfg.resources.process_group_timeout_s == 60
    with pytest.raises(ConfigError, match="process_group_timeout_s"):
        config_from_dict({"resources": {"process_group_timeout_s": 0}})


def test_the_flow_steps_with_bf16_compute_hand_on_a_moved_dpo_model(tmp_path):
    """prepare_data -> sft -> preference[dpo] through steps.pipeline (what the flow's steps call), DPO at lr 1e-8."""
    from steps.pipeline import plan_run, prepare_data, step_context, train_sft, train_variant

    raw = {
        "name": "bf16_test",
        "data": {"input": "embedded", "max_trees": 14, "dev_fraction": 0.2},
        "model": {"base": "tiny", "dtype": "bfloat16"},
        "sft": {"lr": 1e-3, "max_num_tokens": 1024, "max_seq_len": 256, "overlength": "truncate", "max_steps": 2},
        "preference": {
            "criterion": "dpo",
            "lr": 1e-8,
            "final_lr": 5e-9,
            "max_num_tokens": 1024,
            "max_seq_len": 256,
            "overlength": "truncate",
            "max_steps": 2,
        },
        "evaluation": {"enabled": False},
        "resources": {"output_dir": str(tmp_path / "runs")},
    }
    plan, output_root = plan_run(raw, "dpo", "", "", "PrefFlow", "1")
    data_dir, _ = prepare_data(step_context(plan.config, output_root))
    sft = train_sft(step_context(plan.config, output_root), data_dir)
    dpo_plan = next(v for v in plan.variants if v.loss == "dpo")
    dpo = train_variant(step_context(dpo_plan.config, output_root), dpo_plan, data_dir, sft)
    assert sft is not None and dpo is not None and dpo.steps == 2
    sft_weights = load_file(f"{sft.model_dir}/model.safetensors")
    dpo_weights = load_file(f"{dpo.model_dir}/model.safetensors")
    assert all(v.dtype == torch.float32 for v in sft_weights.values())  # the fp32 master weights travel on
    assert _moved_fraction(sft_weights, dpo_weights) >= 0.5
