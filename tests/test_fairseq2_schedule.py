"""The learning-rate schedule against fairseq2's CosineAnnealingLR, value by value, computed by hand:
lr_t = final + (lr - final) / 2 * (1 + cos(pi * t / cycle)), restarting after each cycle; final above lr rises."""

from __future__ import annotations

import math

import pytest
import torch

from steps.config import PreferenceConfig, SFTConfig
from steps.train.schedule import lr_lambda

SQRT_HALF = math.sqrt(0.5)  # cos(pi / 4)


def lr_at(cfg, step: int, total_steps: int) -> float:
    return cfg.lr * lr_lambda(cfg, total_steps)(step)


SFT = SFTConfig(lr=5.5e-6, final_lr=1.1e-6, schedule_cycle_steps=1000)  # the guide's SFT: 1000-step cycle
SIMPO = PreferenceConfig(criterion="simpo", lr=6e-7, final_lr=1.1e-6, schedule_cycle_steps=800)  # rises


@pytest.mark.parametrize(
    "cfg,step,expected",
    [
        (SFT, 0, 5.5e-6),  # t = 0: cos 0 = 1 -> lr
        (SFT, 250, 1.1e-6 + 2.2e-6 * (1 + SQRT_HALF)),  # a quarter: 4.85563e-6
        (SFT, 500, 3.3e-6),  # half: the midpoint of lr and final
        (SFT, 750, 1.1e-6 + 2.2e-6 * (1 - SQRT_HALF)),  # 1.74437e-6
        (SFT, 1000, 5.5e-6),  # fairseq2 restarts the cycle
        (SFT, 1500, 3.3e-6),
        (SIMPO, 0, 6e-7),
        (SIMPO, 200, 1.1e-6 - 2.5e-7 * (1 + SQRT_HALF)),  # rising: 6.73223e-7
        (SIMPO, 400, 8.5e-7),
        (SIMPO, 600, 1.1e-6 - 2.5e-7 * (1 - SQRT_HALF)),  # 1.02678e-6
        (SIMPO, 800, 6e-7),
    ],
)
def test_cosine_matches_fairseq2_by_hand(cfg, step, expected):
    # the run's length does not matter once the cycle is given (fairseq2's cycle_len)
    for total in (240, 1000, 5000):
        assert lr_at(cfg, step, total) == pytest.approx(expected, rel=1e-9)


def test_hand_values_written_out():
    """The same points as plain numbers, so a wrong formula on both sides cannot agree."""
    assert lr_at(SFT, 250, 240) == pytest.approx(4.855635e-6, rel=1e-6)
    assert lr_at(SFT, 750, 240) == pytest.approx(1.744365e-6, rel=1e-6)
    assert lr_at(SIMPO, 200, 800) == pytest.approx(6.732233e-7, rel=1e-6)
    assert lr_at(SIMPO, 600, 800) == pytest.approx(1.026777e-6, rel=1e-6)


def test_without_a_cycle_the_run_itself_is_the_cycle():
    cfg = SFTConfig(lr=1.0, final_lr=0.2)
    assert lr_at(cfg, 0, 10) == 1.0
    assert lr_at(cfg, 5, 10) == pytest.approx(0.6)
    assert lr_at(cfg, 10, 10) == pytest.approx(0.2)  # held at final, no restart
    assert lr_at(cfg, 12, 10) == pytest.approx(0.2)


def test_warmup_then_cycle_after_it():
    cfg = SFTConfig(lr=1.0, final_lr=0.0, warmup_steps=3, schedule_cycle_steps=4)
    assert [lr_at(cfg, s, 100) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_at(cfg, 3, 100) == 1.0
    assert lr_at(cfg, 5, 100) == pytest.approx(0.5)  # t = 2 of a 4-step cycle
    assert lr_at(cfg, 7, 100) == 1.0  # restart


def test_linear_and_constant():
    lin = SFTConfig(lr=1.0, final_lr=0.5, schedule="linear", schedule_cycle_steps=4)
    assert [lr_at(lin, s, 100) for s in (0, 2, 4, 9)] == pytest.approx([1.0, 0.75, 0.5, 0.5])
    up = SFTConfig(lr=1.0, final_lr=2.0, schedule="linear")
    assert lr_at(up, 5, 10) == pytest.approx(1.5)
    const = SFTConfig(lr=1.0, final_lr=2.0, schedule="constant")
    assert lr_at(const, 7, 10) == 1.0


def test_torch_scheduler_uses_it_step_by_step():
    """As the training loop wires it: LambdaLR over AdamW, the lr of optimizer step k is the formula at t = k."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=SIMPO.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(SIMPO, 800))
    seen = []
    for _ in range(801):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [1.1e-6 + 0.5 * (6e-7 - 1.1e-6) * (1 + math.cos(math.pi * (k % 800) / 800)) for k in range(801)]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert max(seen) == pytest.approx(1.1e-6, rel=1e-4) and seen[0] == 6e-7
