"""Turn conversation trees into SFT examples and ranked preference pairs.

Conversation history: every example's prompt is the full path from the root prompt down to the parent of the
reply, as chat messages (oasst ``prompter`` -> ``user``, ``assistant`` -> ``assistant``). Paths whose roles do
not alternate user/assistant starting with the user (impossible in a clean export) are skipped and counted.

Ranks (lower = better) order the assistant replies to one prompter message ("sibling group"):

* an unranked reply (rank null) is never chosen and never rejected: the human rankers did not compare it with its
  siblings (it came after ranking closed, or ranking never finished), so placing it below them would invent a
  judgement. Unranked replies are counted, and can still be SFT examples when ``sft_rank`` is ``None``.
* ranks need not be exactly 0..n-1: filtering removes siblings (leaving gaps) and raw data has ties. Replies are
  ordered by rank; replies with equal rank are never paired with each other. Groups with gaps or ties are counted.
* ``best_vs_rest`` (the documented fairseq2 recipe): each rank-0 reply vs every sibling ranked lower (higher rank
  number). Groups without a rank-0 reply are skipped and counted.
* ``best_vs_worst``: each rank-0 reply vs the sibling(s) with the largest rank; groups without rank 0 skipped.
* ``all_ordered_pairs``: every two siblings with different ranks, the better one chosen.

Pairs whose chosen and rejected texts are identical (after stripping whitespace) carry no preference signal and
are skipped. SFT examples are de-duplicated on (prompt, response), pairs on (prompt, chosen, rejected); the first
occurrence in tree-id order is kept, so the result does not depend on input order.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

from steps.data.oasst_read import OasstMessage
from steps.data.oasst_trees import ConversationForest

PAIR_STRATEGIES = ("best_vs_rest", "best_vs_worst", "all_ordered_pairs")
CHAT_ROLE = {"prompter": "user", "assistant": "assistant"}

ChatMessage = dict[str, str]


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

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tree_id": self.tree_id,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_rank": self.chosen_rank,
            "rejected_rank": self.rejected_rank,
        }


@dataclass
class ExtractedExamples:
    """SFT examples, pairs for every strategy, and counts describing the rank structure met on the way."""

    sft: list[SftExample]
    pairs: dict[str, list[PreferencePair]]
    counts: Counter = field(default_factory=Counter)


def _child_order(message: OasstMessage) -> tuple:
    return (message.rank is None, message.rank if message.rank is not None else 0,
            message.created_date or "", message.message_id)


def _walk_paths(forest: ConversationForest) -> Iterator[tuple[str, int, list[OasstMessage]]]:
    """Depth-first over every tree (trees by id, replies by rank then date): (tree id, index, path from root)."""
    for root in forest.roots:
        tree_id = forest.tree_id[root]
        stack: list[tuple[int, list[OasstMessage]]] = [(root, [])]
        while stack:
            index, ancestors = stack.pop()
            path = ancestors + [forest.messages[index]]
            yield tree_id, index, path
            replies = sorted((forest.messages[c] for c in forest.children.get(index, [])), key=_child_order)
            for reply in reversed(replies):
                stack.append((reply.index, path))


def _as_chat(path: list[OasstMessage]) -> list[ChatMessage] | None:
    """Chat messages for a history path, or ``None`` if roles do not alternate starting with the user."""
    chat = [{"role": CHAT_ROLE[m.role], "content": m.text} for m in path]
    for position, message in enumerate(chat):
        if message["role"] != ("user" if position % 2 == 0 else "assistant"):
            return None
    return chat


def ranked_pairs(ranked: list[OasstMessage], strategy: str) -> list[tuple[OasstMessage, OasstMessage]]:
    """(chosen, rejected) pairs among ranked siblings for one strategy (rules in the module docstring)."""
    ordered = sorted(ranked, key=_child_order)
    if strategy == "all_ordered_pairs":
        return [(a, b) for a in ordered for b in ordered if a.rank < b.rank]
    best = [m for m in ordered if m.rank == 0]
    if strategy == "best_vs_rest":
        return [(a, b) for a in best for b in ordered if b.rank > 0]
    if strategy == "best_vs_worst":
        worst_rank = max(m.rank for m in ordered)
        return [(a, b) for a in best for b in ordered if b.rank == worst_rank and worst_rank > 0]
    raise ValueError(f"unknown pair strategy {strategy!r}; choose one of {PAIR_STRATEGIES}")


def extract_examples(forest: ConversationForest, *, sft_rank: int | None = 0) -> ExtractedExamples:
    """SFT examples (assistant replies of rank ``sft_rank``; ``None`` = every reply) and pairs for all strategies."""
    counts: Counter = Counter()
    sft: list[SftExample] = []
    pairs: dict[str, list[PreferencePair]] = {s: [] for s in PAIR_STRATEGIES}
    seen_sft: set[tuple] = set()
    seen_pairs: dict[str, set[tuple]] = defaultdict(set)

    for tree_id, index, path in _walk_paths(forest):
        message = path[-1]
        history = path[:-1]
        if message.role == "assistant" and history and (sft_rank is None or message.rank == sft_rank):
            prompt = _as_chat(history)
            if prompt is None:
                counts["sft_skipped_non_alternating"] += 1
            else:
                key = (tuple((m["role"], m["content"]) for m in prompt), message.text)
                if key in seen_sft:
                    counts["sft_duplicates_removed"] += 1
                else:
                    seen_sft.add(key)
                    sft.append(SftExample(message.message_id, tree_id, prompt, message.text))

        if message.role != "prompter":
            continue
        replies = [forest.messages[c] for c in forest.children.get(index, [])]
        assistant_replies = [m for m in replies if m.role == "assistant"]
        ranked = [m for m in assistant_replies if m.rank is not None]
        unranked = len(assistant_replies) - len(ranked)
        counts["unranked_replies"] += unranked
        if ranked and unranked:
            counts["unranked_beside_ranked"] += unranked
        if len(ranked) < 2:
            continue
        counts["ranked_groups"] += 1
        ranks = sorted(m.rank for m in ranked)
        distinct = sorted(set(ranks))
        if len(distinct) < len(ranks):
            counts["ranked_groups_with_ties"] += 1
        if distinct != list(range(len(distinct))):
            counts["ranked_groups_with_gaps"] += 1
        if 0 not in distinct:
            counts["ranked_groups_without_rank0"] += 1
        if len(distinct) == 1:
            counts["ranked_groups_all_tied"] += 1
        prompt = _as_chat(path)
        if prompt is None:
            counts["pair_groups_skipped_non_alternating"] += 1
            continue
        prompt_key = tuple((m["role"], m["content"]) for m in prompt)
        for strategy in PAIR_STRATEGIES:
            for chosen, rejected in ranked_pairs(ranked, strategy):
                if chosen.text.strip() == rejected.text.strip():
                    counts[f"identical_text_pairs_skipped.{strategy}"] += 1
                    continue
                key = (prompt_key, chosen.text, rejected.text)
                if key in seen_pairs[strategy]:
                    counts[f"duplicate_pairs_removed.{strategy}"] += 1
                    continue
                seen_pairs[strategy].add(key)
                pairs[strategy].append(
                    PreferencePair(
                        id=f"{chosen.message_id}>{rejected.message_id}",
                        tree_id=tree_id,
                        prompt=prompt,
                        chosen=chosen.text,
                        rejected=rejected.text,
                        chosen_rank=chosen.rank,
                        rejected_rank=rejected.rank,
                    )
                )
    return ExtractedExamples(sft=sft, pairs=pairs, counts=counts)
