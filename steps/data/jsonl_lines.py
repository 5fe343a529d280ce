"""Streaming JSONL input shared by every data format: plain or gzip (by magic bytes), one object per line.

Bad lines never stop a read: each is counted with its line number and reason (:class:`MalformedLines`).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_LISTED_PROBLEMS = 20
"""How many bad lines / rows are listed individually in the stats (all are counted)."""


@dataclass
class MalformedLines:
    """Lines that are not a JSON object: the count and the first few ``{"line", "error"}``."""

    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, lineno: int, error: str, where: str | None = None) -> None:
        self.count += 1
        if len(self.examples) < MAX_LISTED_PROBLEMS:
            self.examples.append(
                {"line": lineno, "error": error} if where is None else {"file": where, "line": lineno, "error": error}
            )

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


def open_lines(path: Path) -> Iterator[bytes]:
    """Raw lines (bytes) of a plain or gzip-compressed file, recognised by its magic bytes, not its name."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        yield from fh


def is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"


def has_lone_surrogate(value: Any) -> bool:
    """A ``\\udXXX`` escape that JSON accepts but UTF-8 cannot encode (it would crash every writer later)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    return False


def parse_line(line: bytes) -> tuple[Any, str | None]:
    """``(value, None)`` for a JSON line, or ``(None, reason)``; never raises."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"not valid JSON: {exc}"
    except RecursionError:
        return None, "JSON nested too deeply to parse"
    try:
        if b"\\u" in line and b"\\ud" in line.lower() and has_lone_surrogate(value):
            return None, "contains a lone UTF-16 surrogate escape (\\udXXX): not valid Unicode"
    except RecursionError:
        return None, "JSON nested too deeply to check"
    return value, None


def is_array_start(line: bytes) -> bool:
    """A first line that opens a JSON array: the whole file is one JSON document, not JSONL."""
    return line.lstrip().startswith(b"[")
