"""The in-memory tree index of an OpenAssistant input: one compact column per field, texts in a spool file.

Memory grows with the number of messages (ids, parents, ranks, offsets), never with the text they hold.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections import Counter
from typing import TYPE_CHECKING, Any

from steps.data.jsonl_lines import MAX_LISTED_PROBLEMS, MalformedLines

if TYPE_CHECKING:
    from steps.data.oasst_read import OasstMessage

ROOT = -1
"""``parent`` of a message whose ``parent_id`` is null."""
MISSING = -2
"""``parent`` of a message whose parent does not exist (or that was dropped while reading)."""
_PENDING = -3

READ_DROPS = ("missing_key", "invalid_field", "duplicate_id")
"""Drop reasons decided while reading (code = position + 1 in ``MessageIndex.read_drop``)."""
ROLE_CODES = {"prompter": 1, "assistant": 2}
ROLE_NAMES = {1: "prompter", 2: "assistant"}
DELETED, SYNTHETIC, REVIEWED = 1, 2, 4
"""Bits of ``MessageIndex.flags``: deleted, synthetic, review_result is true."""


class MessageIndex:
    """Every message read, in read order, as columns; ``read_records`` fetches dates and texts back by offset.

    Duplicate ids are resolved while reading (the first usable occurrence wins), and so are parent ids that
    point backwards; forward references wait in a small table until :meth:`finish`.
    """

    def __init__(self, source: str, location_kind: str = "line") -> None:
        self.source = source
        self.location_kind = location_kind
        self.format: str | None = None
        self.trees_read = 0
        self.malformed = MalformedLines()
        self.ids: list[str | None] = []
        self.parent = array("q")
        self.role = bytearray()
        self.rank: list[int | None] = []
        self.lang = array("q")
        self.tree_state = array("q")
        self.values: list[str | None] = [None]
        self._codes: dict[str | None, int] = {None: 0}
        self.flags = bytearray()
        self.read_drop = bytearray()
        self.number = array("q")
        self.offset = array("q")
        self.date_len = array("q")
        self.text_len = array("q")
        self.root_tree_id: dict[int, str | None] = {}
        self.languages: Counter = Counter()
        self.dropped: Counter = Counter()
        self.problem_examples: list[dict[str, Any]] = []
        self._first: dict[str, int] = {}
        self._pending: dict[int, str] = {}
        self._tree_ids: set[str] = set()
        self._spool = tempfile.TemporaryFile(prefix="prefflow-oasst-", suffix=".texts")  # noqa: SIM115 (closed by close())
        self._spool_size = 0
        # labels and emojis (compact JSON) in a spool of their own: 12 bytes per message in memory
        self.feedback_offset = array("q")
        self.feedback_len = array("i")
        self._feedback = tempfile.TemporaryFile(prefix="prefflow-oasst-", suffix=".feedback")  # noqa: SIM115
        self._feedback_size = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __enter__(self) -> MessageIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._spool.close()
        self._feedback.close()

    def _code(self, value: str | None) -> int:
        code = self._codes.get(value)
        if code is None:
            code = self._codes[value] = len(self.values)
            self.values.append(value)
        return code

    def location(self, i: int) -> str:
        return f"{self.location_kind} {self.number[i]}"

    def _note(self, reason: str, message: OasstMessage, detail: str | None) -> None:
        self.dropped[reason] += 1
        if len(self.problem_examples) < MAX_LISTED_PROBLEMS:
            self.problem_examples.append(
                {"reason": reason, "where": message.location, "message_id": message.message_id, "detail": detail}
            )

    def add(self, message: OasstMessage, number: int) -> None:
        """Fold one parsed message in; ``number`` is its line (or row) number."""
        i = len(self.ids)
        payload = b""
        if not message.problem:
            assert message.text is not None, "parse_message flags a message without text as a problem"
            try:
                payload = (message.created_date or "").encode("utf-8")
                date_len = len(payload)
                payload += message.text.encode("utf-8")
            except UnicodeEncodeError:
                message.problem, message.problem_detail = "invalid_field", "text is not valid Unicode"
        drop = 0
        if message.problem:
            drop = READ_DROPS.index(message.problem) + 1
            self._note(message.problem, message, message.problem_detail)
        else:
            message_id = message.message_id
            assert message_id is not None, "parse_message flags a message without an id as a problem"
            self.languages[message.lang or "unknown"] += 1
            first = self._first.get(message_id)
            if first is not None:
                drop = 3
                self._note("duplicate_id", message, f"first seen at index {first}")
            else:
                self._first[message_id] = i
        if self.format != "trees" and message.message_tree_id is not None:
            self._tree_ids.add(message.message_tree_id)

        parent = MISSING
        if not drop:
            if message.parent_index is not None:
                parent = message.parent_index
            elif message.parent_id is None:
                parent = ROOT
                self.root_tree_id[i] = message.message_tree_id
            else:
                parent = self._first.get(message.parent_id, _PENDING)
                if parent == _PENDING:
                    self._pending[i] = message.parent_id

        self.ids.append(message.message_id)
        self.parent.append(parent)
        self.role.append(ROLE_CODES.get(message.role or "", 0))
        self.rank.append(message.rank)
        self.lang.append(self._code(message.lang))
        self.tree_state.append(self._code(message.tree_state))
        self.flags.append(
            (DELETED if message.deleted else 0)
            | (SYNTHETIC if message.synthetic else 0)
            | (REVIEWED if message.review_result is True else 0)
        )
        self.read_drop.append(drop)
        self.number.append(number)
        if drop:
            self.offset.append(-1)
            self.date_len.append(0)
            self.text_len.append(0)
        else:
            self._spool.write(payload)
            self.offset.append(self._spool_size)
            self.date_len.append(date_len)
            self.text_len.append(len(payload) - date_len)
            self._spool_size += len(payload)
        feedback = message.feedback if not drop else None
        self.feedback_offset.append(self._feedback_size if feedback else -1)
        self.feedback_len.append(len(feedback) if feedback else 0)
        if feedback:
            self._feedback.write(feedback)
            self._feedback_size += len(feedback)

    def finish(self) -> MessageIndex:
        """Resolve forward parent references and free the id table; the index is read-only afterwards."""
        for i, parent_id in self._pending.items():
            self.parent[i] = self._first.get(parent_id, MISSING)
        self._pending.clear()
        self._first.clear()
        if self.format is None:
            self.format = "rows"
        if self.format == "rows":
            self.trees_read = len(self._tree_ids)
        self._tree_ids.clear()
        self._spool.flush()
        self._feedback.flush()
        return self

    def read_records(self, indices: list[int]) -> dict[int, tuple[str, str]]:
        """``{index: (created_date, text)}``, reading adjacent records in one call (a whole export tree at once)."""
        out: dict[int, tuple[str, str]] = {}
        order = sorted(indices, key=self.offset.__getitem__)
        fd = self._spool.fileno()
        start = 0
        while start < len(order):
            end = start + 1
            first = self.offset[order[start]]
            stop = first + self.date_len[order[start]] + self.text_len[order[start]]
            while end < len(order) and self.offset[order[end]] == stop:
                stop += self.date_len[order[end]] + self.text_len[order[end]]
                end += 1
            block = os.pread(fd, stop - first, first)
            for i in order[start:end]:
                at = self.offset[i] - first
                split = at + self.date_len[i]
                out[i] = (block[at:split].decode("utf-8"), block[split : split + self.text_len[i]].decode("utf-8"))
            start = end
        return out

    def feedback_of(self, indices: list[int]) -> dict[int, bytes]:
        """``{index: compact labels/emojis JSON}`` of the messages among ``indices`` that have feedback."""
        fd = self._feedback.fileno()
        return {
            i: os.pread(fd, self.feedback_len[i], self.feedback_offset[i])
            for i in indices
            if self.feedback_offset[i] >= 0
        }

    def message_id(self, i: int) -> str:
        """The id of message ``i``; only messages dropped while reading lack one, and nothing asks for theirs."""
        message_id = self.ids[i]
        if message_id is None:
            raise ValueError(f"{self.location(i)}: the message was dropped while reading and has no usable id")
        return message_id

    def text_of(self, i: int) -> str | None:
        """One message's text (``None`` if it was dropped while reading); for reports and tests."""
        return None if self.offset[i] < 0 else self.read_records([i])[i][1]
