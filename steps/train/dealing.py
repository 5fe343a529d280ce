"""Which micro-batches each optimizer step takes, and which rank runs which (``grad_accum`` is per rank, as in
fairseq2: a step is ``world_size x grad_accum`` micro-batches). Pure functions of counts: every rank plans alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EpochPlan:
    """The optimizer steps of one epoch as lists of micro-batch indices, and the tail micro-batches left out."""

    steps: list[list[int]]
    dropped: list[int] = field(default_factory=list)


def plan_epoch(num_batches: int, world_size: int, grad_accum: int, lockstep: bool, start: int = 0) -> EpochPlan:
    """Group micro-batches ``start..num_batches-1`` into steps of ``world_size * grad_accum``.

    The last step may be short. Every rank must run at least one micro-batch of every step (each rank's last
    backward takes part in the gradient reduction), so a tail of fewer than ``world_size`` micro-batches is
    dropped rather than padded with a dummy. ``lockstep`` (FSDP2: every forward gathers weights on all ranks)
    also needs the same count on every rank: the tail is cut to a multiple of ``world_size``.
    ``start``: micro-batches already trained this epoch (resume), a multiple of the old step size.
    """
    if world_size < 1 or grad_accum < 1:
        raise ValueError(f"world_size and grad_accum must be >= 1, got {world_size}, {grad_accum}")
    per_step = world_size * grad_accum
    steps = [list(range(i, min(i + per_step, num_batches))) for i in range(start, num_batches, per_step)]
    dropped: list[int] = []
    if steps and len(steps[-1]) < per_step:
        tail = steps[-1]
        keep = len(tail) - (len(tail) % world_size if lockstep else 0)
        if len(tail) < world_size:
            keep = 0
        dropped = tail[keep:]
        del tail[keep:]
        if not tail:
            steps.pop()
    return EpochPlan(steps, dropped)


def rank_share(step: list[int], rank: int, world_size: int) -> list[int]:
    """The micro-batches of ``step`` that ``rank`` runs: dealt round-robin (every rank gets at least one when
    the step has at least ``world_size``)."""
    return step[rank::world_size]


def deal(items: list, rank: int, world_size: int) -> list:
    """This rank's share of independent work items (reference scoring, dev batches), round-robin."""
    return items[rank::world_size]


def deal_marked(items: list, rank: int, world_size: int, lockstep: bool = False) -> list[tuple[Any, bool]]:
    """(item, counts) pairs for this rank. ``lockstep``: ranks must run the same number of forwards (FSDP2), so a
    short share is padded with (its first item, or the first overall, False): callers discard those results."""
    mine = [(item, True) for item in items[rank::world_size]]
    if lockstep and items:
        rounds = -(-len(items) // world_size)
        filler = mine[0][0] if mine else items[0]
        mine += [(filler, False)] * (rounds - len(mine))
    return mine
