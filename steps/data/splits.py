"""Deterministic train/dev split by conversation tree.

Position = SHA-256 of ``"{seed}\\0{tree_id}"``: the split depends on the tree ids and seed, never on input order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from steps.data.oasst_trees import tree_order_key


@dataclass(frozen=True)
class TreeSplit:
    train: frozenset[str]
    dev: frozenset[str]


def dev_tree_count(n_trees: int, dev_fraction: float) -> int:
    """``round(dev_fraction * n)``, but at least 1 (and at most n-1) with ≥ 2 trees and a dev set wanted."""
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    if dev_fraction == 0.0 or n_trees < 2:
        return 0
    return min(n_trees - 1, max(1, round(dev_fraction * n_trees)))


def split_trees(tree_ids: Iterable[str], *, dev_fraction: float = 0.1, seed: int = 333) -> TreeSplit:
    """The first ``dev_tree_count`` trees in seeded-hash order are dev, the rest train."""
    unique = sorted(set(tree_ids))
    ordered = sorted(unique, key=lambda t: (tree_order_key(t, seed), t))
    n_dev = dev_tree_count(len(ordered), dev_fraction)
    return TreeSplit(train=frozenset(ordered[n_dev:]), dev=frozenset(ordered[:n_dev]))
