"""Reference log-probs scored inside training: in the first epoch's layout (each pair in the micro-batch and on the
rank that trains it), through the same root and compute context as the policy, before a checkpoint is restored,
and cached so that a resumed run reads them instead of scoring its updated policy."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from steps.train.reference import first_epoch_work
from tests.test_train import TOPICS_DEV, TOPICS_TRAIN, pair_rows


@dataclass
class FakePlan:
    """What first_epoch_work reads of an objective: its config, the epoch-0 micro-batches and the dev batches."""

    batches: list[list[int]]
    dev_batches: list[list[int]]
    grad_accum: int
    dev: list = field(default_factory=lambda: ["d0", "d1", "d2"])

    @property
    def cfg(self):
        return self

    def epoch_plan(self, epoch):
        assert epoch == 0
        return self.batches

    def dev_plan(self):
        return self.dev_batches


BATCHES = [[0], [1, 2], [3], [4, 5], [6]]
DEV = [[0], [1, 2]]


@pytest.mark.parametrize(
    ("world_size", "lockstep", "expected"),
    [
        # one process, grad_accum 2: steps [0,1] [2,3] [4], each in order; the dev batches after them
        (1, False, [[([0], 1), ([1, 2], 1), ([3], 1), ([4, 5], 1), ([6], 1)], [([0], 1), ([1, 2], 1)]]),
        # 2 ranks x 2: step [0,1,2,3] dealt 0,2 / 1,3; the tail [4] is trained by neither (fewer than 2) but still
        # scored, dealt round-robin; under FSDP2 a rank without one repeats a batch whose scores are discarded
        (
            2,
            False,
            [
                [([0], 1), ([3], 1), ([6], 1), ([0], 1)],  # rank 0: batches 0, 2, then tail 4; dev 0
                [([1, 2], 1), ([4, 5], 1), ([1, 2], 1)],  # rank 1: batches 1, 3; dev 1
            ],
        ),
        (
            2,
            True,
            [
                [([0], 1), ([3], 1), ([6], 1), ([0], 1)],
                [([1, 2], 1), ([4, 5], 1), ([6], 0), ([1, 2], 1)],  # the same count of forwards on both ranks
            ],
        ),
    ],
)
def test_scoring_follows_the_first_epochs_dealing(world_size, lockstep, expected):
    fake = FakePlan(BATCHES, DEV, grad_accum=2)
    for rank in range(world_size):
        work = first_epoch_work(fake, rank, world_size, lockstep)
        got = [(b, int(counts)) for b, counts, _ in work]
        want = expected[rank] if world_size > 1 else expected[0] + expected[1]
        assert got == want, (rank, got)


def _cfg(tmp_path: Path, dtype: str = "float32", **preference):
    from steps.config import config_from_dict, for_loss

    raw = {
        "model": {"base": "tiny", "dtype": dtype},
        "preference": {
            "criterion": "dpo",
            "init": "base",
            "lr": 2e-3,
            "max_seq_len": 128,
            "max_num_tokens": 200,
            "dev_every_epoch": False,
            "seed": 3,
            **preference,
        },
        "resources": {"output_dir": str(tmp_path / "runs")},
    }
    return for_loss(config_from_dict(raw), "dpo")


@pytest.fixture()
def data_dir(tmp_path):
    from steps.io import write_jsonl

    path = tmp_path / "data"
    path.mkdir()
    write_jsonl(path / "preference.train.jsonl", pair_rows(TOPICS_TRAIN[:8]))
    write_jsonl(path / "preference.dev.jsonl", [dict(r, id=f"d{r['id']}") for r in pair_rows(TOPICS_DEV[:3])])
    return path


class Scorings:
    """Counts the micro-batches the trainer's reference pass scores (the shared scorer as steps.train.reference
    calls it; dev metrics call it from steps.train.objectives and are not counted)."""

    def __init__(self, monkeypatch):
        import steps.train.reference as reference

        self.batches = 0
        real = reference.score_pairs

        def counted(model, pairs, plan, *args, **kwargs):
            self.batches += len(plan)
            return real(model, pairs, plan, *args, **kwargs)

        monkeypatch.setattr(reference, "score_pairs", counted)


def test_a_resumed_run_reads_the_cache_or_scores_the_initial_weights_again(tmp_path, data_dir, monkeypatch):
    from steps.train.recipes import run_preference

    out = tmp_path / "run"
    cfg = _cfg(tmp_path, max_steps=2, checkpoint_every_steps=1)
    first = run_preference(cfg, "dpo", data_dir, out)
    cache = out / "reference_logps.json"
    scored = json.loads(cache.read_text())
    assert scored["reference"] == "tiny" and scored["precision"] == "float32 (cpu)"
    assert first.steps == 2 and first.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)

    counter = Scorings(monkeypatch)  # the checkpoint of step 2 is there: nothing left to train, cache read back
    again = run_preference(cfg, "dpo", data_dir, out)
    assert counter.batches == 0 and again.resumed_from and again.steps == 2

    cache.unlink()  # scored again, before the step-2 weights are restored: the initial weights' numbers
    run_preference(cfg, "dpo", data_dir, out)
    assert counter.batches > 0
    assert json.loads(cache.read_text())["scores"] == scored["scores"]


def test_a_cache_written_for_other_numerics_is_not_reused(tmp_path, data_dir, monkeypatch, caplog):
    from steps.train.recipes import run_preference

    out = tmp_path / "run"
    run_preference(_cfg(tmp_path, max_steps=1), "dpo", data_dir, out)
    counter = Scorings(monkeypatch)
    caplog.set_level(logging.INFO, logger="steps.train.reference")
    bf16 = _cfg(tmp_path, "bfloat16", max_steps=1)
    (out / "checkpoints").rename(tmp_path / "old-checkpoints")
    run_preference(bf16, "dpo", data_dir, out)
    assert counter.batches > 0
    assert "scoring the reference again" in caplog.text
    assert json.loads((out / "reference_logps.json").read_text())["precision"].startswith("bfloat16 compute")


@pytest.mark.parametrize("mode", ["precompute", "live"])
def test_a_separately_loaded_reference_computes_exactly_like_the_policy(tmp_path, data_dir, mode, caplog):
    """reference 'tiny:{}' is the init's weights under another name, so it is loaded on its own (master dtype, the
    policy's compute path): with bf16 compute DPO's first step still has logits exactly 0 and loss ln 2."""
    from steps.train.recipes import run_preference

    caplog.set_level(logging.INFO, logger="steps.models.load")
    cfg = _cfg(tmp_path, "bfloat16", max_steps=1, reference="tiny:{}", reference_mode=mode)
    summary = run_preference(cfg, "dpo", data_dir, tmp_path / mode)
    first = summary.history[0]
    assert first["logits"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(loads) == 2 and all("float32" in m for m in loads)  # policy and reference, both in the master dtype


def test_pairs_without_scores_are_scored_by_the_policy_when_nothing_else_is_given(tokenizer, tmp_path):
    from steps.config import PreferenceConfig
    from steps.losses import build_loss
    from steps.models import load_model
    from steps.train.loop import train
    from steps.train.objectives import PreferenceObjective
    from tests.test_train import pairs_from_rows

    pairs = pairs_from_rows(tokenizer, pair_rows(TOPICS_TRAIN[:6]))
    cfg = PreferenceConfig(lr=1e-3, max_num_tokens=200, max_steps=1, dev_every_epoch=False, seed=3)
    objective = PreferenceObjective(pairs, [], tokenizer.pad_token_id, cfg, build_loss("dpo", beta=0.1), True)
    result = train(load_model("tiny", seed=5), objective, cfg, tmp_path)
    assert all(p.reference_chosen is not None and p.reference_rejected is not None for p in pairs)
    assert result.history[0]["logits"] == 0.0 and result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
