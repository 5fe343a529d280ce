"""Filter OpenAssistant messages and assemble the surviving conversation trees.

Every message read ends up either kept or dropped for exactly one reason, checked in this order (the first that
applies is the one counted):

1. ``missing_key`` / ``invalid_field`` – the message itself is unusable (see ``oasst_read.parse_message``);
2. ``duplicate_id`` – a message id seen before (the first occurrence in read order is kept);
3. ``cycle`` – the message sits on a parent chain that loops back on itself (flat rows only; nesting cannot loop);
4. the content filters, in order: ``tree_state``, ``lang``, ``deleted``, ``review``, ``synthetic``;
5. ``orphan`` – the message passed all of the above but its parent is missing or was dropped, so its
   conversation history is incomplete; its whole subtree goes with it;
6. ``max_trees`` – its tree is beyond the requested number of trees.

So ``messages_read == messages_kept + sum(dropped.values())`` always holds.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from steps.data.oasst_read import MAX_LISTED_PROBLEMS, OasstMessage

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


@dataclass(frozen=True)
class MessageFilters:
    """Which messages count as usable. ``None`` (or empty) for ``langs`` / ``tree_states`` means all."""

    langs: tuple[str, ...] | None = ("en",)
    tree_states: tuple[str, ...] | None = ("ready_for_export",)
    include_deleted: bool = False
    require_review: bool = True
    include_synthetic: bool = False

    def failing_filter(self, message: OasstMessage) -> str | None:
        """Name of the first content filter ``message`` fails, or ``None``."""
        if self.tree_states and message.tree_state not in self.tree_states:
            return "tree_state"
        if self.langs and message.lang not in self.langs:
            return "lang"
        if message.deleted and not self.include_deleted:
            return "deleted"
        if self.require_review and message.review_result is not True:
            return "review"
        if message.synthetic and not self.include_synthetic:
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
    """Kept messages linked into trees: ``children`` lists reply indices, ``tree_id`` maps each root to its id."""

    messages: dict[int, OasstMessage]
    children: dict[int, list[int]]
    roots: list[int]
    tree_id: dict[int, str]
    dropped: Counter = field(default_factory=Counter)
    problem_examples: list[dict[str, Any]] = field(default_factory=list)


def tree_order_key(tree_id: str, seed: int) -> str:
    """Seeded, input-order-independent position of a tree (used for the split and for ``max_trees``)."""
    return hashlib.sha256(f"{seed}\x00{tree_id}".encode("utf-8")).hexdigest()


def _find_cycle_members(parent_of: dict[int, int | None]) -> set[int]:
    """Indices on a parent chain that loops back on itself (iterative, so deep chains cannot overflow)."""
    state: dict[int, int] = {}  # 1 = on the current walk, 2 = finished
    in_cycle: set[int] = set()
    for start in parent_of:
        if start in state:
            continue
        path: list[int] = []
        node: int | None = start
        while node is not None and node in parent_of and node not in state:
            state[node] = 1
            path.append(node)
            node = parent_of[node]
        if node is not None and state.get(node) == 1:  # walked back into this very path: a loop
            in_cycle.update(path[path.index(node):])
        for visited in path:
            state[visited] = 2
    return in_cycle


def build_forest(
    messages: Sequence[OasstMessage],
    filters: MessageFilters,
    *,
    max_trees: int | None = None,
    seed: int = 333,
) -> ConversationForest:
    """Apply the drop rules (module docstring) and link what survives into conversation trees."""
    dropped: Counter = Counter()
    reason_of: dict[int, str] = {}
    examples: list[dict[str, Any]] = []

    def drop(message: OasstMessage, reason: str, detail: str | None = None) -> None:
        reason_of[message.index] = reason
        dropped[reason] += 1
        if reason in ("missing_key", "invalid_field", "duplicate_id", "cycle") and len(examples) < MAX_LISTED_PROBLEMS:
            examples.append(
                {"reason": reason, "where": message.location, "message_id": message.message_id, "detail": detail}
            )

    # 1-2: unusable messages and duplicate ids
    first_index_of_id: dict[str, int] = {}
    for message in messages:
        if message.problem:
            drop(message, message.problem, message.problem_detail)
        elif message.message_id in first_index_of_id:
            drop(message, "duplicate_id", f"first seen at index {first_index_of_id[message.message_id]}")
        else:
            first_index_of_id[message.message_id] = message.index
    by_index = {m.index: m for m in messages}

    # resolve parents: nesting for export trees, parent_id for flat rows; -1 marks "parent not available"
    parent_of: dict[int, int | None] = {}
    for message in messages:
        if message.index in reason_of:
            continue
        if message.parent_index is not None:
            parent_of[message.index] = message.parent_index
        elif message.parent_id is None:
            parent_of[message.index] = None
        else:
            parent_of[message.index] = first_index_of_id.get(message.parent_id, -1)

    # 3: cycles (only among messages still in play; a dropped duplicate cannot close a loop)
    for index in sorted(_find_cycle_members({i: (p if p in parent_of else None) for i, p in parent_of.items()})):
        drop(by_index[index], "cycle", "parent chain loops back to this message")
        del parent_of[index]

    # 4: content filters
    for index in list(parent_of):
        reason = filters.failing_filter(by_index[index])
        if reason:
            drop(by_index[index], reason)
            del parent_of[index]

    # 5: orphans – walk up to a root; anything that hits a dropped/missing parent goes with its subtree
    connected: dict[int, bool] = {}
    for start in parent_of:
        path: list[int] = []
        node: int | None = start
        while node is not None and node not in connected:
            if node not in parent_of:  # dropped or never existed
                break
            path.append(node)
            node = parent_of[node]
        ok = node is None or connected.get(node, False)
        for visited in path:
            connected[visited] = ok
    for index in parent_of:
        if not connected[index]:
            drop(by_index[index], "orphan")
    kept = {i: by_index[i] for i in parent_of if connected[i]}

    children: dict[int, list[int]] = defaultdict(list)
    roots: list[int] = []
    for index in kept:
        parent = parent_of[index]
        if parent is None:
            roots.append(index)
        else:
            children[parent].append(index)
    tree_id = {r: kept[r].message_tree_id or kept[r].message_id for r in roots}

    # 6: max_trees – keep a seeded, input-order-independent subset of the trees
    if max_trees is not None and len(roots) > max_trees:
        ordered = sorted(roots, key=lambda r: (tree_order_key(tree_id[r], seed), tree_id[r]))
        for root in ordered[max_trees:]:
            stack = [root]
            while stack:
                index = stack.pop()
                stack.extend(children.pop(index, []))
                drop(kept.pop(index), "max_trees")
            del tree_id[root]
        roots = ordered[:max_trees]

    logger.info(
        "kept %d of %d messages in %d trees; dropped %s",
        len(kept), len(messages), len(roots), dict(sorted(dropped.items())),
    )
    return ConversationForest(
        messages=kept,
        children=dict(children),
        roots=sorted(roots, key=lambda r: tree_id[r]),
        tree_id=tree_id,
        dropped=dropped,
        problem_examples=examples,
    )
