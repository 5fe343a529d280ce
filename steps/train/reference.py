"""Reference log-probs scored exactly as the policy computes: through the training root (bare, DDP's module, FSDP2),
under the run's compute context (autocast, or FSDP2's mixed-precision policy) and in the micro-batch layout of the
first epoch (each pair in the micro-batch it trains in, on the rank that trains it; dev pairs as evaluation deals
them). The loop asks for it once, before step 1 and before a checkpoint is restored, so a policy that is its own
reference gives DPO logits of exactly 0 (loss ln 2) at step 1 on any number of ranks. Rank 0 caches the scores in the
run directory: a resumed run reads them back and never scores its updated policy."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steps.train import collectives, parallel
from steps.train.batching import PairExample
from steps.train.dealing import deal_marked, plan_epoch, rank_share
from steps.train.pair_scores import score_pairs
from steps.train.precision import Precision

logger = logging.getLogger(__name__)

CACHE_FILE = "reference_logps.json"

#: (example indices of one micro-batch, whether its scores count: False for the repeats that keep FSDP2's ranks in
#: step, split) in the order a rank scores them.
Work = tuple[list[int], bool, str]


@dataclass(frozen=True)
class ReferenceSource:
    """Where missing reference scores come from: ``load`` builds a separate frozen reference root laid out like the
    policy (``parallel.prepare_frozen``); None scores the policy itself before its first update. ``spec`` names the
    reference in ``cache`` (None: nothing cached)."""

    spec: str | None = None
    cache: Path | None = None
    load: Callable[[], Any] | None = None


@dataclass(frozen=True)
class References:
    """How a preference run gets its reference log-probs: none (reference-free), the policy with its adapters off
    (``from_policy``), a separate ``live`` model scoring every batch, or ``source``: scored before step 1 inside
    ``train()`` (this module), by the wrapped policy itself or a separately loaded reference. ``spec`` names the
    reference (None: no named reference)."""

    spec: str | None = None
    from_policy: bool = False
    live: Any = None
    source: ReferenceSource | None = None


def has_pending(pairs: Iterable[PairExample]) -> bool:
    return any(p.reference_chosen is None or p.reference_rejected is None for p in pairs)


def pending_anywhere(pairs: Iterable[PairExample], device: torch.device) -> bool:
    """Whether any rank lacks a score (a node that does not see rank 0's cache file): then every rank scores, since
    scoring is collective (FSDP2 gathers weights in each forward; the scores are summed over ranks)."""
    flag = torch.tensor([1.0 if has_pending(pairs) else 0.0], device=device)
    collectives.all_reduce_sum(flag, device, "reference pending")
    return bool(flag.item() > 0)


def cache_key(spec: str, precision: Precision) -> dict[str, str]:
    """What cached scores must match to be reused: the reference and the numerics they were computed in."""
    return {"reference": spec, "precision": precision.describe()}


def cached_scores(path: Path, key: dict[str, str]) -> dict[str, list]:
    """The ``scores`` of the cache at ``path`` when it was written for ``key``, else none."""
    from steps.io import read_json

    if not Path(path).exists():
        return {}
    cached = read_json(path)
    stale = {k: cached.get(k) for k in key if cached.get(k) != key[k]}
    if stale:
        logger.info("%s: written for %s, not %s: scoring the reference again", path, stale, key)
        return {}
    return cached.get("scores", {})


def read_cache(path: Path, key: dict[str, str], pairs: Sequence[PairExample]) -> int:
    """Fill ``pairs`` from ``path`` when it was written for ``key``; returns how many pairs it filled."""
    scores = cached_scores(path, key)
    if not scores:
        return 0
    filled = 0
    for pair in pairs:
        if pair.id in scores:
            pair.reference_chosen, pair.reference_rejected = scores[pair.id]
            filled += 1
    logger.info("reference log-probs of %d pairs read from %s", filled, path)
    return filled


def write_cache(path: Path, key: dict[str, str], pairs: Sequence[PairExample]) -> None:
    from steps.io import write_json

    scores = {p.id: [p.reference_chosen, p.reference_rejected] for p in pairs}
    write_json(path, {**key, "scores": scores}, indent=None)
    logger.info("reference log-probs of %d pairs written to %s", len(scores), path)


def first_epoch_work(objective: Any, rank: int, world_size: int, lockstep: bool) -> list[Work]:
    """This rank's micro-batches in the order and composition training gives them: epoch 0's steps dealt as the loop
    deals them, then the tail micro-batches the epoch leaves out, then the dev batches as evaluation deals them."""
    cfg = objective.cfg
    batches = objective.epoch_plan(0)
    plan = plan_epoch(len(batches), world_size, cfg.grad_accum, lockstep)
    work: list[Work] = [(batches[i], True, "train") for step in plan.steps for i in rank_share(step, rank, world_size)]
    dropped = [batches[i] for i in plan.dropped]
    work += [(b, counts, "train") for b, counts in deal_marked(dropped, rank, world_size, lockstep)]
    if objective.dev:
        work += [(b, counts, "dev") for b, counts in deal_marked(objective.dev_plan(), rank, world_size, lockstep=True)]
    return work


def score_pending(objective: Any, root: Any, precision: Precision, source: ReferenceSource) -> None:
    """Score every pair of ``objective`` (train and dev) whose reference log-probs are missing, with the reference
    ``source`` names, in the training layout of ``root``; every rank ends with every score. Collective."""
    pairs = list(objective.train) + list(objective.dev)
    device = parallel.device_of(root)
    if not pending_anywhere(pairs, device):
        return
    started = time.perf_counter()
    rank, world_size = collectives.world()
    scorer = source.load() if source.load is not None else parallel.root_of(root)
    if scorer is None:
        raise TypeError(f"reference scoring needs the training root, got {type(root).__name__}")
    work = first_epoch_work(objective, rank, world_size, lockstep=parallel.is_sharded(root))
    with parallel.compute_context(root, precision):
        split_scores = [
            score_pairs(
                scorer,
                split_pairs,
                [(indices, counts) for indices, counts, s in work if s == split],
                objective.collate_examples,
                desc=f"reference log-probs ({split})",
            )[:, :2]
            for split, split_pairs in (("train", objective.train), ("dev", objective.dev))
        ]
    parallel.reshard(scorer)
    scores = torch.cat(split_scores)
    collectives.all_reduce_sum(scores, device, "reference log-probs")
    for pair, (chosen, rejected) in zip(pairs, scores.tolist()):
        if pair.reference_chosen is None or pair.reference_rejected is None:
            pair.reference_chosen, pair.reference_rejected = chosen, rejected
    logger.info(
        "reference log-probs (%s) for %d pairs in %.1f s: %s, %d rank(s), the first epoch's micro-batches",
        source.spec or "the policy before its first update",
        len(pairs),
        time.perf_counter() - started,
        precision.describe(),
        world_size,
    )
    if source.load is not None:
        del scorer
    if rank == 0 and source.cache is not None and source.spec is not None:
        write_cache(source.cache, cache_key(source.spec, precision), pairs)


def autocast_or_nothing(model: Any, precision: Precision | None) -> contextlib.AbstractContextManager[Any]:
    """The compute context of ``model`` under ``precision`` (nothing when no precision is given)."""
    return parallel.compute_context(model, precision) if precision is not None else contextlib.nullcontext()
