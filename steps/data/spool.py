"""Streaming outputs: rows go to a temp spool as they are made, then to train/dev files once the split is known.

Final files are written like ``steps.io`` writes (temp file in the same directory, fsync, rename), line by line.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def dumps_line(row: dict[str, Any]) -> bytes:
    """One JSONL line exactly as ``steps.io.write_jsonl`` writes it."""
    return (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")


class AtomicFile:
    """``with AtomicFile(path) as fh: fh.write(b"...")``: the file appears complete, or not at all."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh: IO[bytes] | None = None
        self._tmp = ""

    def __enter__(self) -> IO[bytes]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._fh = os.fdopen(fd, "wb", buffering=1 << 20)
        return self._fh

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        assert self._fh is not None
        try:
            if exc_type is None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            self._fh.close()
            if exc_type is None:
                os.chmod(self._tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; follow the umask like open() would
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


class RoutedSpool:
    """Rows of one kind (two renderings each: chat and fairseq2) tagged with their group's position."""

    def __init__(self) -> None:
        # closed by close(); deleted by the OS even if the process dies
        self.files = (
            tempfile.TemporaryFile(prefix="prefflow-rows-"),  # noqa: SIM115
            tempfile.TemporaryFile(prefix="prefflow-rows-"),  # noqa: SIM115
        )
        self.groups = array("q")

    def add(self, group: int, *lines: bytes) -> None:
        for fh, line in zip(self.files, lines):
            fh.write(line)
        self.groups.append(group)

    def __len__(self) -> int:
        return len(self.groups)

    def route(self, side_of: Callable[[int], str], targets: Sequence[dict[str, Path]]) -> dict[str, int]:
        """Copy every spooled line to ``targets[rendering][side]`` in spool order; rows per side.

        Every target is open on one ExitStack: if one fails to commit (ENOSPC at fsync), the others still exit
        and remove their temp files."""
        sizes = dict.fromkeys(targets[0], 0)
        with contextlib.ExitStack() as stack:
            for rendering, fh in enumerate(self.files):
                fh.flush()
                fh.seek(0)
                handles = {side: stack.enter_context(AtomicFile(path)) for side, path in targets[rendering].items()}
                for group, line in zip(self.groups, fh):
                    side = side_of(group)
                    handles[side].write(line)
                    if rendering == 0:
                        sizes[side] += 1
        return sizes

    def close(self) -> None:
        for fh in self.files:
            fh.close()
