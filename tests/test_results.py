"""Typed training results (steps.results.TrainResult): the JSON pair across the torchrun boundary, the plain dicts
earlier runs stored as artifacts (still read: reports are regenerated from every earlier run), and the report's
one adapter between the two (steps.report.records.curves_of)."""

from __future__ import annotations

import copy

import pytest

from steps.config import LoraConfig, PreferenceConfig, SFTConfig
from steps.io import read_json, write_json
from steps.report.records import TrainingCurves, curves_of
from steps.results import TrainResult

STEP_1 = {"step": 1, "epoch": 0, "lr": 0.001, "loss": 0.6931471824645996, "reward_margin": 0.0, "tokens": 702.0}
STEP_2 = {"step": 2, "epoch": 0, "lr": 0.00055, "loss": 0.6817349791526794, "reward_margin": 0.0251, "tokens": 712.0}
DEV = {
    "step": 2,
    "epoch": 0,
    "dev_loss": 0.5973419972828456,
    "dev_reward_accuracy": 0.8571428571428571,
    "dev_pairs": 7.0,
}
#: The ``train_summary`` artifact of a DPO variant as PrefFlow stored it before results were typed
#: (``RunSummary.as_dict()`` plus the launcher's layout and load memory): every key and the training section exactly as
#: written by that code on a tiny 2-step run; only the per-step metrics are cut to a few.
EARLIER_DPO_ARTIFACT = {
    "kind": "dpo",
    "model_dir": "/tmp/rf_old/runs/PrefFlow/1/dpo/final",
    "init": "/tmp/rf_old/runs/PrefFlow/1/sft/final",
    "init_label": "SFT checkpoint",
    "reference": "/tmp/rf_old/runs/PrefFlow/1/sft/final",
    "steps": 2,
    "elapsed_s": 2.896505312000045,
    "tokens_per_s": 488.17448880272525,
    "final_train": STEP_2,
    "final_dev": DEV,
    "data_stats": {
        "train": {"kept": 27, "dropped_overlength": 0, "truncated": 0, "tokens": 4179},
        "dev": {"kept": 7, "dropped_overlength": 0, "truncated": 0, "tokens": 1141},
    },
    "metrics_path": "/tmp/rf_old/runs/PrefFlow/1/dpo/metrics.jsonl",
    "config": {
        "lr": 0.001, "final_lr": None, "schedule": "cosine", "warmup_steps": 0, "schedule_cycle_steps": None,
        "betas": [0.9, 0.95], "weight_decay": 0.1, "max_grad_norm": 1.0, "max_num_tokens": 1024,
        "max_batch_examples": None, "max_seq_len": 256, "overlength": "truncate", "grad_accum": 1, "epochs": 1,
        "max_steps": 2, "max_examples": None, "seed": 1814, "mask_source_tokens": True,
        "checkpoint_every_steps": None, "keep_checkpoints": 1, "dev_every_epoch": True, "parallelism": "ddp",
        "lora": {"enabled": False, "r": 16, "alpha": 32, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "load_in_4bit": False,
                 "bnb_4bit_quant_type": "nf4", "hand_on": "merged"},
        "criterion": "dpo",
        "criterion_config": {"_type_": "steps.losses.dpo.DPOConfig", "beta": 0.1, "nll_scale": 0.0,
                             "label_smoothing": 0.0, "length_normalization": False},
        "init": "auto", "reference": "auto", "reference_mode": "precompute", "per_loss": {},
    },
    "resumed_from": None,
    "precision": "float32 (cpu)",
    "world_size": 1,
    "history": [STEP_1, STEP_2],
    "dev_history": [DEV],
    "layout": {"parallelism": "none", "world_size": 1},
    "load_memory": {},
}  # fmt: skip


def test_an_earlier_runs_dict_reads_as_a_typed_result_and_back():
    result = TrainResult.from_dict(EARLIER_DPO_ARTIFACT)
    assert isinstance(result.config, PreferenceConfig) and result.config.criterion == "dpo"
    # the section's own values, not a reader's defaults (TrainConfig's max_seq_len is 8192; the old reader said 2048)
    assert (result.config.max_seq_len, result.config.lr, result.config.betas) == (256, 0.001, (0.9, 0.95))
    assert result.config.criterion_config.beta == result.loss_beta == 0.1
    assert (result.steps, result.init_label, result.history) == (2, "SFT checkpoint", [STEP_1, STEP_2])
    back = result.to_dict()
    added = set(back["config"]) - set(EARLIER_DPO_ARTIFACT["config"])  # sections added to the config since then
    assert added == {"on_policy"} and back["config"]["on_policy"]["enabled"] is False  # at their defaults
    back["config"] = {k: v for k, v in back["config"].items() if k not in added}
    assert back == EARLIER_DPO_ARTIFACT  # nothing lost either way


def test_a_result_crosses_the_torchrun_boundary_as_json(tmp_path):
    """What rank 0 writes and the launching step reads: equal, with the typed section (LoRA, tuple betas) intact."""
    section = SFTConfig(lr=2e-5, max_seq_len=512, betas=(0.8, 0.9), lora=LoraConfig(enabled=True, r=4, alpha=8))
    metrics = ({"loss": 2.0}, {"dev_loss": 2.5}, {"train": {"kept": 3}}, "sft/metrics.jsonl")
    result = TrainResult("sft", "sft/final", "tiny", "base: tiny", None, section, 3, 1.5, 100.0, *metrics, history=[{}])
    path = write_json(tmp_path / "launch_summary.json", result.to_dict())
    again = TrainResult.from_dict(read_json(path), str(path))
    assert again == result and again.config.betas == (0.8, 0.9) and again.config.lora.r == 4
    assert again.loss_beta is None  # SFT has no loss beta


def test_a_mapping_that_is_no_result_is_refused_with_its_source():
    unknown = {**EARLIER_DPO_ARTIFACT, "extra": 1}
    with pytest.raises(ValueError, match=r"summary\.json: not a training result \(unknown keys \['extra'\]"):
        TrainResult.from_dict(unknown, "summary.json")
    missing = {k: v for k, v in EARLIER_DPO_ARTIFACT.items() if k not in ("model_dir", "steps")}
    with pytest.raises(ValueError, match=r"missing keys \['model_dir', 'steps'\]"):
        TrainResult.from_dict(missing, "summary.json")


def test_the_report_reads_curves_of_typed_results_and_of_earlier_dicts():
    typed = TrainResult.from_dict(EARLIER_DPO_ARTIFACT)
    expected = TrainingCurves([STEP_1, STEP_2], [DEV])
    assert curves_of(typed) == curves_of(copy.deepcopy(EARLIER_DPO_ARTIFACT)) == expected
    # a run from before the histories were kept: a result row without curves
    assert curves_of({"kind": "sft", "model_dir": "m", "steps": 3}) == TrainingCurves([], [])
