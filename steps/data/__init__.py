"""Data preparation: OpenAssistant conversations -> SFT examples and preference pairs (see ``steps.data.oasst``).

Names are loaded lazily so that ``python -m steps.data.oasst`` does not import the module twice.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "EMBEDDED_SAMPLE",
    "PAIR_STRATEGIES",
    "OasstDataError",
    "OasstInputNotFoundError",
    "PreparedData",
    "prepare_oasst",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from steps.data import oasst

        return getattr(oasst, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
