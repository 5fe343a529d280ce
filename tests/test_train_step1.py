"""DPO straight from the base model (init = reference = base) with bf16 compute over fp32 master weights: at step 1
the policy is its own reference, so every pair's logits are exactly 0 and the loss is ln 2, in one process and on 2
gloo ranks with FSDP2, through the launcher users run. The reference is scored through the wrapped model, in the same
precision and micro-batch layout as training. Before (a separate reference pass over unshuffled batches, and under
FSDP2 the unsharded fp32 model under autocast), these runs started at logits -0.0067 / loss 0.6965 in one process
and -0.0065 / 0.6966 on 2 ranks.

Half the pairs have long prompts and short replies, half the reverse, so that the batch composition decides the
layout (prompt shared in one row, or one row per reply) and the padding: in bf16 a pair then scores up to 0.5 nats
apart in two compositions."""

from __future__ import annotations

import math
import os

import pytest

from steps.results import TrainResult
from tests.test_train import TOPICS_TRAIN

DEFAULT = "embedded:smollm2-135m-instruct"
DETAIL = " Please be detailed about their history, uses, and cultural meaning."


def mixed_pair_rows(n: int) -> list[dict]:
    rows = []
    for i, t in enumerate(TOPICS_TRAIN[:n]):
        long_prompt = i % 2 == 0
        rows.append(
            {
                "id": f"m{i}",
                "prompt": [{"role": "user", "content": f"Describe {t}." + (DETAIL * 3 if long_prompt else "")}],
                "chosen": f"{t.capitalize()} are wonderful" + ("" if long_prompt else " and helpful" * 12) + ".",
                "rejected": f"{t.capitalize()} are terrible"
                + ("" if long_prompt else " and useless" * (10 + i % 3))
                + ".",
            }
        )
    return rows


def dpo_config(base: str, grad_accum: int, **preference) -> dict:
    return {
        "name": "step1",
        "model": {"base": base, "dtype": "bfloat16", "master_dtype": "float32"},
        "preference": {
            "criterion": "dpo",
            "criterion_config": {"beta": 0.1},
            "init": "base",
            "lr": 1e-8,
            "max_seq_len": 256,
            "max_num_tokens": 1024,
            "max_batch_examples": 3,
            "grad_accum": grad_accum,
            "max_steps": 1,
            "dev_every_epoch": False,
            "parallelism": "fsdp",
            "seed": 1814,
            **preference,
        },
        "resources": {"process_group_timeout_s": 300},
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from steps.io import write_jsonl

    path = tmp_path_factory.mktemp("step1-data")
    write_jsonl(path / "preference.train.jsonl", mixed_pair_rows(8))
    return path


def _launch(raw: dict, data_dir, out, nproc: int) -> TrainResult:
    from steps.config import config_from_dict, for_loss
    from steps.train.launch import launch

    os.environ["OMP_NUM_THREADS"] = "1"
    summary = launch(for_loss(config_from_dict(raw), "dpo"), "dpo", str(data_dir), str(out), nproc_per_node=nproc)
    assert summary is not None and summary.steps == 1
    return summary


def _assert_policy_is_its_reference(summary: TrainResult) -> None:
    first = summary.history[0]
    assert abs(first["logits"]) <= 1e-3, first  # measured: 0.0 in one process and on 2 FSDP2 ranks
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3), first
    assert summary.precision == "bfloat16 compute, float32 master weights (cpu)"


def test_one_process_starts_at_logits_zero_and_loss_ln2(data_dir, tmp_path):
    summary = _launch(dpo_config(DEFAULT, grad_accum=2), data_dir, tmp_path / "one", nproc=1)
    _assert_policy_is_its_reference(summary)
    assert summary.world_size == 1


def test_two_fsdp2_ranks_start_at_logits_zero_and_loss_ln2_after_loading_once(data_dir, tmp_path):
    summary = _launch(dpo_config(DEFAULT, grad_accum=1), data_dir, tmp_path / "two", nproc=2)
    _assert_policy_is_its_reference(summary)
    layout = summary.layout
    assert (summary.world_size, layout["parallelism"], layout["mesh"]) == (2, "fsdp", [2])
    # rank 0 read the model; rank 1's load cost its own half of the weights plus under half the model's size
    model_mib = 134_515_008 * 4 / 2**20
    rank1 = summary.load_memory["policy"][1]
    assert rank1["rank"] == 1 and rank1["transient_mib"] < model_mib / 2, rank1


def test_a_live_reference_is_sharded_like_the_policy(data_dir, tmp_path):
    """reference_mode live with another spec for the same weights: a second model, loaded by rank 0, sharded by
    FSDP2 with the policy's mixed-precision policy; it scores exactly as the policy does at step 1."""
    raw = dpo_config("tiny", grad_accum=1, reference="tiny:{}", reference_mode="live")
    summary = _launch(raw, data_dir, tmp_path / "live", nproc=2)
    _assert_policy_is_its_reference(summary)
    assert summary.history[0]["logits"] == 0.0
    assert [r["rank"] for r in summary.load_memory["reference"]] == [0, 1]
