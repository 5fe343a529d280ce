"""Filter OpenAssistant messages and link the survivors into conversation trees, over the compact index.

Every message read is kept or dropped for exactly one reason (``build_forest`` lists the order).
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from steps.data.jsonl_lines import MAX_LISTED_PROBLEMS
from steps.data.oasst_index import DELETED, READ_DROPS, REVIEWED, ROOT, SYNTHETIC, MessageIndex

logger = logging.getLogger(__name__)

DROP_REASONS = (
    "missing_key",
    "invalid_field",
    "duplicate_id",
    "cycle",
    "tree_state",
    "lang",
    "deleted",
    "review",
    "synthetic",
    "orphan",
    "max_trees",
)
_CODE = {reason: code for code, reason in enumerate(DROP_REASONS, 1)}
assert all(_CODE[r] == i for i, r in enumerate(READ_DROPS, 1)), "read-time drop codes must match DROP_REASONS"


@dataclass(frozen=True)
class MessageFilters:
    """Which messages count as usable. ``None`` (or empty) for ``langs`` / ``tree_states`` means all."""

    langs: tuple[str, ...] | None = ("en",)
    tree_states: tuple[str, ...] | None = ("ready_for_export",)
    include_deleted: bool = False
    require_review: bool = True
    include_synthetic: bool = False

    def failing_filter(self, index: MessageIndex, i: int) -> str | None:
        """Name of the first content filter message ``i`` fails, or ``None``."""
        flags = index.flags[i]
        if self.tree_states and index.values[index.tree_state[i]] not in self.tree_states:
            return "tree_state"
        if self.langs and index.values[index.lang[i]] not in self.langs:
            return "lang"
        if flags & DELETED and not self.include_deleted:
            return "deleted"
        if self.require_review and not flags & REVIEWED:
            return "review"
        if flags & SYNTHETIC and not self.include_synthetic:
            return "synthetic"
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "langs": list(self.langs) if self.langs else "all",
            "tree_states": list(self.tree_states) if self.tree_states else "all",
            "include_deleted": self.include_deleted,
            "require_review": self.require_review,
            "include_synthetic": self.include_synthetic,
        }


@dataclass
class ConversationForest:
    """Kept messages (``reason[i] == 0``) linked into trees: children of ``i`` are ``child[start[i]:start[i+1]]``
    in read order; ``roots`` are sorted by tree id and ``tree_id`` maps each root to its id."""

    index: MessageIndex
    reason: bytearray
    start: array
    child: array
    roots: list[int]
    tree_id: dict[int, str]
    kept: int
    dropped: Counter = field(default_factory=Counter)
    problem_examples: list[dict[str, Any]] = field(default_factory=list)

    def children(self, i: int) -> array:
        return self.child[self.start[i] : self.start[i + 1]]

    def members(self, root: int) -> list[int]:
        """Every message of the tree under ``root``."""
        out, stack = [], [root]
        while stack:
            i = stack.pop()
            out.append(i)
            stack.extend(self.children(i))
        return out


def tree_order_key(tree_id: str, seed: int) -> str:
    """Seeded, input-order-independent position of a tree (used for the split and for ``max_trees``)."""
    return hashlib.sha256(f"{seed}\x00{tree_id}".encode()).hexdigest()


def _cycle_members(parent: array, reason: bytearray) -> list[int]:
    """Messages still in play on a parent chain that loops back on itself (iterative: deep chains are fine)."""
    state = bytearray(len(parent))  # 1 = on the current walk, 2 = finished
    members: list[int] = []
    for begin in range(len(parent)):
        if reason[begin] or state[begin]:
            continue
        path: list[int] = []
        node = begin
        while node >= 0 and not reason[node] and not state[node]:
            state[node] = 1
            path.append(node)
            node = parent[node]
        if node >= 0 and not reason[node] and state[node] == 1:  # walked back into this very path
            members.extend(path[path.index(node) :])
        for visited in path:
            state[visited] = 2
    return sorted(members)


def _disconnected(parent: array, reason: bytearray) -> bytearray:
    """1 for messages in play whose chain reaches a root, 2 for those that hit a dropped or missing parent."""
    state = bytearray(len(parent))
    for begin in range(len(parent)):
        if reason[begin] or state[begin]:
            continue
        path: list[int] = []
        node = begin
        while True:
            if node == ROOT:
                ok = True
                break
            if node < 0 or reason[node]:
                ok = False
                break
            if state[node]:
                ok = state[node] == 1
                break
            path.append(node)
            node = parent[node]
        for visited in path:
            state[visited] = 1 if ok else 2
    return state


def build_forest(
    index: MessageIndex, filters: MessageFilters, *, max_trees: int | None = None, seed: int = 333
) -> ConversationForest:
    """Apply the drop rules, first match counted, and link what survives into conversation trees.

    1. ``missing_key`` / ``invalid_field``: the message itself is unusable (``oasst_read.parse_message``);
    2. ``duplicate_id``: a message id seen before (the first usable occurrence in read order is kept);
    3. ``cycle``: the message sits on a parent chain that loops back on itself (nesting cannot loop);
    4. the content filters, in order: ``tree_state``, ``lang``, ``deleted``, ``review``, ``synthetic``;
    5. ``orphan``: its parent is missing or was dropped, so its history is incomplete; its subtree goes too;
    6. ``max_trees``: its tree is beyond the requested number of trees (a seeded, order-independent subset).

    So ``messages_read == messages_kept + sum(dropped.values())`` always holds.
    """
    n = len(index)
    reason = bytearray(index.read_drop)
    dropped: Counter = Counter(index.dropped)
    examples = list(index.problem_examples)

    def drop(i: int, why: str, detail: str | None = None) -> None:
        reason[i] = _CODE[why]
        dropped[why] += 1
        if detail is not None and len(examples) < MAX_LISTED_PROBLEMS:
            examples.append({"reason": why, "where": index.location(i), "message_id": index.ids[i], "detail": detail})

    parent = index.parent
    for i in _cycle_members(parent, reason):
        drop(i, "cycle", "parent chain loops back to this message")
    for i in range(n):
        if not reason[i]:
            why = filters.failing_filter(index, i)
            if why:
                drop(i, why)
    state = _disconnected(parent, reason)
    for i in range(n):
        if not reason[i] and state[i] == 2:
            drop(i, "orphan")
    del state

    counts = array("q", bytes(8 * (n + 1)))
    roots: list[int] = []
    for i in range(n):
        if not reason[i]:
            if parent[i] == ROOT:
                roots.append(i)
            else:
                counts[parent[i] + 1] += 1
    for i in range(n):
        counts[i + 1] += counts[i]
    child = array("q", bytes(8 * counts[n]))
    fill = array("q", counts)
    for i in range(n):
        if not reason[i] and parent[i] != ROOT:
            child[fill[parent[i]]] = i
            fill[parent[i]] += 1
    del fill
    tree_id = {r: index.root_tree_id.get(r) or index.message_id(r) for r in roots}
    forest = ConversationForest(index, reason, counts, child, roots, tree_id, 0, dropped, examples)

    if max_trees is not None and len(roots) > max_trees:
        ordered = sorted(roots, key=lambda r: (tree_order_key(tree_id[r], seed), tree_id[r]))
        for root in ordered[max_trees:]:
            for i in forest.members(root):
                drop(i, "max_trees")
            del tree_id[root]
        roots = ordered[:max_trees]
    forest.roots = sorted(roots, key=lambda r: tree_id[r])
    forest.kept = n - sum(dropped.values())
    logger.info(
        "kept %d of %d messages in %d trees; dropped %s",
        forest.kept,
        n,
        len(forest.roots),
        dict(sorted(dropped.items())),
    )
    return forest
