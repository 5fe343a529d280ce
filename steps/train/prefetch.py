"""Collation off the training thread: one background thread builds the coming optimizer steps' micro-batches, in step
order, into a queue of at most ``depth`` steps (pinned for an asynchronous copy when the device is a GPU), while the
training thread computes. An error in collation reaches the training thread at the step it belongs to; every wait is
bounded."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

#: How long the training thread waits for one step's micro-batches before it gives up (collation of one step takes
#: milliseconds to seconds; this bound only turns a wedged thread into an error).
WAIT_S = 600.0
#: How long the thread may take to notice a stop (it checks between puts).
POLL_S = 0.1


class CollationError(RuntimeError):
    """Collation in the background failed or produced nothing in time."""


class StepPrefetcher:
    """``get(i)`` returns ``make(i)`` for i = 0, 1, ... count-1, made ahead on a thread (a context manager)."""

    def __init__(
        self,
        make: Callable[[int], list[Any]],
        count: int,
        *,
        pin: bool = False,
        depth: int = 2,
        wait_s: float = WAIT_S,
    ):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.make, self.count, self.pin, self.wait_s = make, count, pin, wait_s
        self._queue: queue.Queue[tuple[int, Any, BaseException | None]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="collate-ahead", daemon=True)
        self._next = 0

    def __enter__(self) -> StepPrefetcher:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the step it is collating) and wait for it, within the same bound."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.wait_s)
            if self._thread.is_alive():
                logger.warning("collation thread still busy after %.0f s; left behind (daemon)", self.wait_s)

    def _produce(self) -> None:
        for i in range(self.count):
            if self._stop.is_set():
                return
            try:
                batches = self.make(i)
                if self.pin:
                    batches = [b.pin_memory() for b in batches]
                item: tuple[int, Any, BaseException | None] = (i, batches, None)
            except BaseException as exc:  # handed to the training thread, which raises it
                item = (i, None, exc)
            if not self._put(item) or item[2] is not None:
                return

    def _put(self, item: tuple[int, Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> list[Any]:
        """The next step's micro-batches (in step order); re-raises what collation raised for that step."""
        if self._next >= self.count:
            raise IndexError(f"all {self.count} steps were handed out")
        try:
            index, batches, error = self._queue.get(timeout=self.wait_s)
        except queue.Empty:
            raise CollationError(
                f"no micro-batches for step {self._next + 1} of {self.count} after {self.wait_s:.0f} s: the "
                "collation thread is stuck or died"
            ) from None
        if index != self._next:
            raise CollationError(f"collation out of order: got step {index}, expected {self._next}")
        self._next += 1
        if error is not None:
            raise CollationError(f"collating the micro-batches of step {index + 1} failed: {error}") from error
        return batches
