"""Read OpenAssistant messages (Hub rows, parquet, JSONL(.gz) rows or export trees) into a compact index.

Only ids, parents, ranks and filter fields stay in memory; texts go to a spool file (``oasst_index``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from steps.data.jsonl_lines import MAX_LISTED_PROBLEMS, is_array_start, is_parquet, open_lines, parse_line
from steps.data.oasst_feedback import encode_feedback
from steps.data.oasst_index import MessageIndex
from steps.data.records import DataError

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

EMBEDDED_SAMPLE = Path(__file__).resolve().parent / "embedded" / "oasst2_sample.trees.jsonl"
"""The small, original (not OASST-derived) sample that ``input="embedded"`` selects."""

ROLES = ("prompter", "assistant")
__all__ = [
    "EMBEDDED_SAMPLE",
    "MAX_LISTED_PROBLEMS",
    "OasstDataError",
    "OasstInputNotFoundError",
    "OasstMessage",
    "looks_like_hub_id",
    "parse_message",
    "read_dataset_rows",
    "read_local_file",
    "read_oasst",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet")


class OasstDataError(DataError):
    """OpenAssistant input that cannot be used: missing file, unreadable format, nothing left after filtering."""


class OasstInputNotFoundError(OasstDataError, FileNotFoundError):
    """The input names a local file that does not exist."""


@dataclass(slots=True)
class OasstMessage:
    """One message as parsed, before it is folded into the index. ``index`` is unique even when ids repeat."""

    index: int
    message_id: str | None
    parent_id: str | None
    parent_index: int | None
    """Trees format only: index of the structural parent (the node this one is nested in)."""
    text: str | None
    role: str | None
    lang: str | None
    review_result: bool | None
    deleted: bool
    rank: int | None
    synthetic: bool
    tree_state: str | None
    message_tree_id: str | None
    created_date: str | None
    location: str
    """Where the message came from, for error reports: ``line 12`` or ``row 12``."""
    problem: str | None = None
    """``missing_key`` or ``invalid_field`` when the message cannot be used; ``problem_detail`` says which."""
    problem_detail: str | None = None
    feedback: bytes | None = None
    """Its ``labels`` and ``emojis``, compacted (``oasst_feedback.encode_feedback``); never a reason to drop it."""


def _optional_bool(value: Any, name: str) -> tuple[bool | None, str | None]:
    if value is None or isinstance(value, bool):
        return value, None
    return None, f"{name} must be true/false/null, got {value!r}"


def _optional_rank(value: Any) -> tuple[int | None, str | None]:
    """Ranks arrive as int (JSON), float (parquet/pandas, NaN for null) or null."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return None, f"rank must be a non-negative integer or null, got {value!r}"
    if isinstance(value, float):
        if math.isnan(value):
            return None, None
        if not value.is_integer():
            return None, f"rank must be a non-negative integer or null, got {value!r}"
        value = int(value)
    if isinstance(value, int) and value >= 0:
        return value, None
    return None, f"rank must be a non-negative integer or null, got {value!r}"


def _optional_str(value: Any, name: str) -> tuple[str | None, str | None]:
    if value is None or isinstance(value, str):
        return value, None
    return None, f"{name} must be a string or null, got {type(value).__name__}"


def parse_message(
    raw: dict[str, Any],
    *,
    index: int,
    location: str,
    parent_index: int | None = None,
    tree_state: str | None = None,
    message_tree_id: str | None = None,
    structural: bool = False,
) -> OasstMessage:
    """Turn one raw message dict into an ``OasstMessage``, flagging (never raising on) bad fields.

    ``structural`` means the parent comes from nesting (trees format), so ``parent_id`` need not be present;
    flat rows must carry the ``parent_id`` key (null for a root) or a reply would silently become a root.
    """
    required = ("message_id", "role", "text") if structural else ("message_id", "parent_id", "role", "text")
    missing = [key for key in required if key not in raw]
    problems: list[str] = []

    def checked(value_and_problem: tuple[_T, str | None]) -> _T:
        value, problem = value_and_problem
        if problem:
            problems.append(problem)
        return value

    message_id = raw.get("message_id")
    if "message_id" in raw and (not isinstance(message_id, str) or not message_id):
        problems.append(f"message_id must be a non-empty string, got {message_id!r}")
        message_id = None
    parent_id = checked(_optional_str(raw.get("parent_id"), "parent_id"))
    role = raw.get("role")
    if "role" in raw and role not in ROLES:
        problems.append(f"role must be one of {ROLES}, got {role!r}")
    text = raw.get("text")
    if "text" in raw and (not isinstance(text, str) or not text.strip()):
        problems.append("text must be a non-empty string")
    lang = checked(_optional_str(raw.get("lang"), "lang"))
    review_result = checked(_optional_bool(raw.get("review_result"), "review_result"))
    deleted = checked(_optional_bool(raw.get("deleted"), "deleted"))
    synthetic = checked(_optional_bool(raw.get("synthetic"), "synthetic"))
    rank = checked(_optional_rank(raw.get("rank")))
    if not structural:
        tree_state = checked(_optional_str(raw.get("tree_state"), "tree_state"))
        message_tree_id = checked(_optional_str(raw.get("message_tree_id"), "message_tree_id"))
    created = raw.get("created_date")
    message = OasstMessage(
        index=index,
        message_id=message_id if isinstance(message_id, str) else None,
        parent_id=parent_id,
        parent_index=parent_index,
        text=text if isinstance(text, str) else None,
        role=role if role in ROLES else None,
        lang=lang,
        review_result=review_result,
        deleted=bool(deleted),
        rank=rank,
        synthetic=bool(synthetic),
        tree_state=tree_state,
        message_tree_id=message_tree_id,
        created_date=str(created) if created is not None else None,
        location=location,
        feedback=encode_feedback(raw.get("labels"), raw.get("emojis")),
    )
    if missing:
        message.problem, message.problem_detail = "missing_key", f"missing {', '.join(missing)}"
    elif problems:
        message.problem, message.problem_detail = "invalid_field", "; ".join(problems)
    return message


class _Reader:
    """Walks one input and folds every message into a :class:`MessageIndex`."""

    def __init__(self, source: str, location_kind: str = "line") -> None:
        self.index = MessageIndex(source, location_kind)
        self.lines_seen = 0

    def add_row(self, raw: dict[str, Any], number: int) -> None:
        index = self.index
        index.add(parse_message(raw, index=len(index), location=f"{index.location_kind} {number}"), number)

    def add_tree(self, raw: dict[str, Any], lineno: int) -> None:
        """Flatten one export tree in pre-order; nested replies get their structural parent's index."""
        index = self.index
        prompt = raw.get("prompt")
        if not isinstance(prompt, dict):
            index.malformed.add(lineno, "tree line without a 'prompt' object")
            return
        index.trees_read += 1
        tree_state, _ = _optional_str(raw.get("tree_state"), "tree_state")
        tree_id, _ = _optional_str(raw.get("message_tree_id"), "message_tree_id")
        if tree_id is None and isinstance(prompt.get("message_id"), str):
            tree_id = prompt["message_id"]
        location = f"line {lineno}"
        stack: list[tuple[dict[str, Any], int | None]] = [(prompt, None)]
        while stack:
            node, parent_index = stack.pop()
            message = parse_message(
                node,
                index=len(index),
                location=location,
                parent_index=parent_index,
                tree_state=tree_state,
                message_tree_id=tree_id,
                structural=True,
            )
            replies = node.get("replies")
            if replies is not None and not isinstance(replies, list):
                message.problem = message.problem or "invalid_field"
                message.problem_detail = message.problem_detail or "replies must be a list"
                replies = []
            index.add(message, lineno)
            # reversed so that replies come out in file order (stack is LIFO)
            for reply in reversed(replies or []):
                if isinstance(reply, dict):
                    stack.append((reply, message.index))
                else:
                    index.malformed.add(lineno, f"reply of {message.message_id} is not a JSON object")

    def add_line(self, line: bytes, lineno: int) -> None:
        index = self.index
        if not line.strip():
            return
        self.lines_seen += 1
        if self.lines_seen == 1 and is_array_start(line):  # the whole file is one JSON document
            raise OasstDataError(
                f"{index.source}: line {lineno} starts a JSON array; expected JSONL (one JSON object per line), "
                "e.g. convert with `jq -c '.[]'`"
            )
        raw, error = parse_line(line)
        if error:
            index.malformed.add(lineno, error)
            return
        if not isinstance(raw, dict):
            index.malformed.add(lineno, f"expected a JSON object, got {type(raw).__name__}")
            return
        if index.format is None:
            # a tree line has "prompt" (and "message_tree_id"); a message row always has "message_id"
            index.format = "trees" if "prompt" in raw and "message_id" not in raw else "rows"
            logger.info("%s: detected %s format from line %d", index.source, index.format, lineno)
        if index.format == "trees":
            self.add_tree(raw, lineno)
        else:
            self.add_row(raw, lineno)


def read_local_file(path: Path) -> MessageIndex:
    """Read a local parquet, JSONL or JSONL.gz file of rows or export trees, streaming (one batch/line at a time)."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        reader = _Reader(str(path), "row")
        reader.index.format = "rows"
        parquet = pq.ParquetFile(path)
        with tqdm(total=parquet.metadata.num_rows, unit="rows", desc=f"read {path.name}", disable=None) as bar:
            row_number = 0
            for batch in parquet.iter_batches(batch_size=4096):
                for raw in batch.to_pylist():
                    row_number += 1
                    reader.add_row(raw, row_number)
                bar.update(batch.num_rows)
    else:
        reader = _Reader(str(path))
        try:
            lines = open_lines(path)
            for lineno, line in enumerate(tqdm(lines, unit="lines", desc=f"read {path.name}", disable=None), 1):
                reader.add_line(line, lineno)
        except (OSError, EOFError) as exc:  # truncated gzip, unreadable file
            reader.index.close()
            raise OasstDataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    index = reader.index.finish()
    logger.info(
        "%s: read %d messages in %d trees (%s format), %d malformed lines",
        path,
        len(index),
        index.trees_read,
        index.format,
        index.malformed.count,
    )
    return index


def read_hub_dataset(dataset_id: str, split: str) -> MessageIndex:
    """Read flat message rows of a Hub dataset such as ``OpenAssistant/oasst2`` (needs network or a cache)."""
    try:
        from datasets import load_dataset

        dataset = load_dataset(dataset_id, split=split)
    except Exception as exc:  # network, offline mode, unknown id, unknown split: all mean "cannot load"
        raise OasstDataError(
            f"{dataset_id}: cannot load Hub dataset split {split!r} ({type(exc).__name__}: {exc}); "
            "check the id and split, unset HF_HUB_OFFLINE if the dataset is not cached, or pass a local file"
        ) from exc
    return read_dataset_rows(dataset, f"{dataset_id}[{split}]")


def read_dataset_rows(dataset: Any, source: str) -> MessageIndex:
    """Read the flat message rows of a loaded ``datasets.Dataset`` (Arrow batches: much faster than row dicts)."""
    reader = _Reader(source, "row")
    reader.index.format = "rows"
    row_number = 0
    with tqdm(total=len(dataset), unit="rows", desc=f"read {source}", disable=None) as bar:
        for table in dataset.with_format("arrow").iter(batch_size=4096):
            for raw in table.to_pylist():
                row_number += 1
                reader.add_row(raw, row_number)
            bar.update(table.num_rows)
    index = reader.index.finish()
    logger.info("%s: read %d messages in %d trees", index.source, len(index), index.trees_read)
    return index


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` with no file suffix; a local path of that shape wins when it exists."""
    return bool(_HUB_ID.match(spec)) and not spec.lower().endswith(_FILE_SUFFIXES)


def read_oasst(spec: str | Path, split: str = "train") -> MessageIndex:
    """Read ``spec``: ``"embedded"``, a local file path, or a Hub dataset id (``split`` applies to Hub ids only)."""
    if str(spec) == "embedded":
        return read_local_file(EMBEDDED_SAMPLE)
    path = Path(spec).expanduser()
    if path.is_file():
        return read_local_file(path)
    if path.is_dir():
        raise OasstDataError(f"{path}: is a directory; pass one parquet / JSONL(.gz) / trees.jsonl(.gz) file")
    if isinstance(spec, str) and looks_like_hub_id(spec):
        return read_hub_dataset(spec, split)
    raise OasstInputNotFoundError(
        f"{spec}: no such file; pass an existing parquet / JSONL(.gz) / trees.jsonl(.gz) path, "
        "a Hub id like OpenAssistant/oasst2, or 'embedded'"
    )
