"""Turn conversation trees into SFT examples and ranked preference pairs, one tree at a time.

The rules (history, ranks, strategies, de-duplication) are in :func:`iter_examples`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from steps.data.oasst_index import ROLE_NAMES
from steps.data.oasst_trees import ConversationForest
from steps.data.records import ChatMessage, assistant_turn

PAIR_STRATEGIES = ("best_vs_rest", "best_vs_worst", "all_ordered_pairs")
CHAT_ROLE = {"prompter": "user", "assistant": "assistant"}
_CHAT_ROLE_OF_CODE = {code: CHAT_ROLE[name] for code, name in ROLE_NAMES.items()}


@dataclass
class SftExample:
    id: str
    tree_id: str
    prompt: list[ChatMessage]
    response: str

    def to_row(self) -> dict[str, Any]:
        return {"id": self.id, "tree_id": self.tree_id, "prompt": self.prompt, "response": self.response}


@dataclass
class PreferencePair:
    id: str
    tree_id: str
    prompt: list[ChatMessage]
    chosen: str
    rejected: str
    chosen_rank: int
    rejected_rank: int
    reference_score_chosen: float | None = None
    reference_score_rejected: float | None = None

    def to_row(self) -> dict[str, Any]:
        """TRL's conversational preference layout (``chosen`` / ``rejected`` are one assistant message each)."""
        return {
            "id": self.id,
            "tree_id": self.tree_id,
            "prompt": self.prompt,
            "chosen": assistant_turn(self.chosen),
            "rejected": assistant_turn(self.rejected),
            "chosen_rank": self.chosen_rank,
            "rejected_rank": self.rejected_rank,
        }


@dataclass(slots=True)
class _Node:
    """What the walk knows about one kept message of the tree being read."""

    index: int
    message_id: str
    role: int
    rank: int | None
    created: str
    text: str

    def order(self) -> tuple:
        return (self.rank is None, self.rank if self.rank is not None else 0, self.created, self.message_id)


def ranked_pairs(ranked: Sequence[Any], strategy: str) -> list[tuple[Any, Any]]:
    """(chosen, rejected) pairs among ranked siblings (objects with ``rank`` and ``order()``) for one strategy."""
    ordered = sorted(ranked, key=lambda m: m.order())
    if strategy == "all_ordered_pairs":
        return [(a, b) for a in ordered for b in ordered if a.rank < b.rank]
    best = [m for m in ordered if m.rank == 0]
    if strategy == "best_vs_rest":
        return [(a, b) for a in best for b in ordered if b.rank > 0]
    if strategy == "best_vs_worst":
        worst_rank = max(m.rank for m in ordered)
        return [(a, b) for a in best for b in ordered if b.rank == worst_rank and worst_rank > 0]
    raise ValueError(f"unknown pair strategy {strategy!r}; choose one of {PAIR_STRATEGIES}")


def _field(tag: bytes, text: str) -> bytes:
    data = text.encode("utf-8")
    return tag + len(data).to_bytes(8, "little") + data


def _rank_counts(counts: Counter, ranks: list[int]) -> None:
    counts["ranked_groups"] += 1
    ranks = sorted(ranks)
    distinct = sorted(set(ranks))
    if len(distinct) < len(ranks):
        counts["ranked_groups_with_ties"] += 1
    if distinct != list(range(len(distinct))):
        counts["ranked_groups_with_gaps"] += 1
    if 0 not in distinct:
        counts["ranked_groups_without_rank0"] += 1
    if len(distinct) == 1:
        counts["ranked_groups_all_tied"] += 1


def iter_examples(
    forest: ConversationForest, counts: Counter, *, sft_rank: int | None = 0
) -> Iterator[tuple[str, int, SftExample | PreferencePair]]:
    """``("sft", root position, example)`` and ``(strategy, root position, pair)`` in walk order.

    Walk order: trees by id, depth first, replies by rank (unranked last) then date then id. Every example's
    prompt is the whole path from the root prompt to the reply's parent (oasst ``prompter`` -> ``user``); paths
    whose roles do not alternate user/assistant from the user are skipped and counted.

    Ranks (lower = better) order the assistant replies to one prompter message. An unranked reply is never
    chosen or rejected (nobody compared it with its siblings), only counted, and can still be an SFT example when
    ``sft_rank`` is ``None``. Ranks need not be 0..n-1 (gaps and ties are counted; equal ranks are never paired).
    ``best_vs_rest``: each rank-0 reply vs every sibling ranked lower (the fairseq2 recipe); ``best_vs_worst``: vs
    the largest rank; ``all_ordered_pairs``: every two siblings with different ranks. Groups without rank 0 give no
    best_* pairs. Pairs whose texts are equal after stripping are skipped; SFT examples are de-duplicated on
    (prompt, response) and pairs on (prompt, chosen, rejected), first occurrence in walk order kept, via 128-bit
    digests of length-prefixed texts (so memory holds 16 bytes per example, not the texts).
    """
    index = forest.index
    seen_sft: set[bytes] = set()
    seen_pairs: dict[str, set[bytes]] = {s: set() for s in PAIR_STRATEGIES}
    roots = tqdm(forest.roots, unit="trees", desc="examples", disable=None)
    for position, root in enumerate(roots):
        tree_id = forest.tree_id[root]
        records = index.read_records(forest.members(root))
        nodes = {
            i: _Node(i, index.message_id(i), index.role[i], index.rank[i], date, text)
            for i, (date, text) in records.items()
        }
        # (node, chat history above it, history alternates?, digest state of the history)
        stack: list[tuple[_Node, list[ChatMessage], bool, Any]] = [
            (nodes[root], [], True, hashlib.blake2b(digest_size=16))
        ]
        while stack:
            node, history, alternating, history_hash = stack.pop()
            role = _CHAT_ROLE_OF_CODE[node.role]
            path = history + [{"role": role, "content": node.text}]
            path_alternating = alternating and role == ("user" if len(history) % 2 == 0 else "assistant")
            path_hash = history_hash.copy()
            path_hash.update(_field(b"u" if role == "user" else b"a", node.text))

            if role == "assistant" and history and (sft_rank is None or node.rank == sft_rank):
                if not alternating:
                    counts["sft_skipped_non_alternating"] += 1
                else:
                    key = history_hash.copy()
                    key.update(_field(b"r", node.text))
                    digest = key.digest()
                    if digest in seen_sft:
                        counts["sft_duplicates_removed"] += 1
                    else:
                        seen_sft.add(digest)
                        yield "sft", position, SftExample(node.message_id, tree_id, history, node.text)

            replies = [nodes[c] for c in forest.children(node.index)]
            if node.role == 1:
                yield from _group_pairs(
                    replies, path, path_alternating, path_hash, tree_id, position, seen_pairs, counts
                )
            for reply in sorted(replies, key=_Node.order, reverse=True):
                stack.append((reply, path, path_alternating, path_hash))


def _group_pairs(
    replies: list[_Node],
    path: list[ChatMessage],
    alternating: bool,
    path_hash: Any,
    tree_id: str,
    position: int,
    seen: dict[str, set[bytes]],
    counts: Counter,
) -> Iterator[tuple[str, int, PreferencePair]]:
    """Pairs among the assistant replies to one prompter message, for every strategy."""
    assistant_replies = [m for m in replies if m.role == 2]
    ranked = [m for m in assistant_replies if m.rank is not None]
    unranked = len(assistant_replies) - len(ranked)
    counts["unranked_replies"] += unranked
    if ranked and unranked:
        counts["unranked_beside_ranked"] += unranked
    if len(ranked) < 2:
        return
    _rank_counts(counts, [m.rank for m in ranked if m.rank is not None])
    if not alternating:
        counts["pair_groups_skipped_non_alternating"] += 1
        return
    for strategy in PAIR_STRATEGIES:
        for chosen, rejected in ranked_pairs(ranked, strategy):
            if chosen.text.strip() == rejected.text.strip():
                counts[f"identical_text_pairs_skipped.{strategy}"] += 1
                continue
            key = path_hash.copy()
            key.update(_field(b"c", chosen.text) + _field(b"x", rejected.text))
            digest = key.digest()
            if digest in seen[strategy]:
                counts[f"duplicate_pairs_removed.{strategy}"] += 1
                continue
            seen[strategy].add(digest)
            yield (
                strategy,
                position,
                PreferencePair(
                    id=f"{chosen.message_id}>{rejected.message_id}",
                    tree_id=tree_id,
                    prompt=path,
                    chosen=chosen.text,
                    rejected=rejected.text,
                    chosen_rank=chosen.rank,
                    rejected_rank=rejected.rank,
                ),
            )
