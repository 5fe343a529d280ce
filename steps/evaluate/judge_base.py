"""The interface every pairwise judge implements (alpaca_eval's annotation fields, preference in [1, 2]), kept
apart so that judge modules and the annotation cache can import it without importing each other."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any


class Judge(abc.ABC):
    """Judges (instruction, output_1, output_2) pairs; results carry ``preference`` in [1, 2] plus raw fields."""

    name: str = ""

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """What produced the judgements, recorded with every result (``annotator`` and metadata)."""

    @property
    def cache_identity(self) -> str:
        """Everything that changes a judgement; part of every cache key."""
        return self.label

    @property
    def weak_judge(self) -> bool:
        return False

    @property
    def price_model(self) -> str | None:
        """The model name looked up in the judge price table; None for judges that run locally (no bill)."""
        return None

    def check(self) -> None:  # noqa: B027  (optional hook: most judges have nothing to check)
        """Raise JudgeError now if the judge cannot run (called before any generation starts)."""

    @abc.abstractmethod
    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        """Judge each pair, calling ``on_result(index, result)`` as soon as each result exists."""

    def metadata(self) -> dict[str, Any]:
        return {"judge": self.label, "weak_judge": self.weak_judge}
