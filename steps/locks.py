"""One exclusive file lock (POSIX ``flock``) for every "one process at a time" section of the pipeline: building
a model cache entry once, letting one CPU-heavy step run at a time on a laptop, and writing the report while
another run may be writing it too."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: str | Path, what: str = "") -> Iterator[float]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; yields the seconds waited.

    When another process holds it, says so in the log (naming ``what`` and the lock file) and waits.
    The lock is released when the block ends or the process dies, so a killed holder never blocks others.
    """
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        started = time.monotonic()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: waiting for %s (held by another process)", what or "lock", lock_path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            logger.info("%s: got %s after %.1f s", what or "lock", lock_path, time.monotonic() - started)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
