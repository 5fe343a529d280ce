"""Data preparation: OpenAssistant trees or preference datasets -> SFT examples and preference pairs.

``prepare_data`` (``steps.data.prepare``) is the entry point; names load lazily (``python -m steps.data.oasst``).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "EMBEDDED_SAMPLE",
    "PAIR_STRATEGIES",
    "OasstDataError",
    "OasstInputNotFoundError",
    "OasstOptions",
    "PreparedData",
    "prepare_oasst",
}
_PREPARE_EXPORTS = {"FORMATS", "prepare_data"}
_RECORD_EXPORTS = {"DataError", "pair_messages", "sft_messages"}

__all__ = sorted(_EXPORTS | _PREPARE_EXPORTS | _RECORD_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from steps.data import oasst

        return getattr(oasst, name)
    if name in _PREPARE_EXPORTS:
        from steps.data import prepare

        return getattr(prepare, name)
    if name in _RECORD_EXPORTS:
        from steps.data import records

        return getattr(records, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
