"""Learning-rate schedules as the multiplier of ``lr`` for each optimizer step (what torch's LambdaLR calls).

The cosine is fairseq2's CosineAnnealingLR: ``final + (lr - final) / 2 * (1 + cos(pi * t / cycle))``."""

from __future__ import annotations

import math
from collections.abc import Callable

from steps.config import TrainConfig


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` in optimizer step ``step`` (0-based): linear warmup, then the schedule to final_lr.

    Warmup takes ``(step + 1) / (warmup + 1)``, so no step runs at lr 0. The cycle after warmup is
    ``cfg.schedule_cycle_steps`` steps, or the run's own ``total_steps - warmup`` when that is null. A run shorter
    than its cycle stops part-way (fairseq2's ``cycle_len`` of ``max_num_steps`` in a run that ends on epochs); a
    longer one restarts the cosine, as fairseq2's does; a linear schedule stays at final_lr. With final_lr above
    lr the same formulas rise instead of fall.
    """
    final_ratio = (cfg.final_lr if cfg.final_lr is not None else 0.1 * cfg.lr) / cfg.lr
    warmup = cfg.warmup_steps
    explicit = cfg.schedule_cycle_steps
    cycle = explicit if explicit is not None else max(1, total_steps - warmup)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        t = step - warmup
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - final_ratio) * min(1.0, t / cycle)
        position = t % cycle if explicit is not None else min(t, cycle)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * position / cycle))

    return fn
