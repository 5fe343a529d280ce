"""What every name -> class table shares (losses in steps/losses, judges in steps/evaluate/judges): the rule for
names and the check that one name means one class, so that a module dropped in can add an entry and not replace one."""

from __future__ import annotations

import re
from typing import Any

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]*$")


def check_name(kind: str, name: object) -> None:
    """ValueError unless ``name`` is lower-case letters, digits, '_' or '-', starting with a letter."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"{kind} name {name!r} must be lower-case letters, digits, '_' or '-', starting with a letter")


def claim_name(table: dict[str, Any], kind: str, name: str, cls: type, error: type[Exception]) -> None:
    """Enter ``cls`` in ``table`` under ``name``; ``error`` when another class holds it (the same class imported
    again, e.g. a reloaded module, may register again)."""
    existing = table.get(name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise error(
            f"{kind} name {name!r} is already registered by {existing.__module__}."
            f"{existing.__qualname__}; {cls.__module__}.{cls.__qualname__} must use another name"
        )
    table[name] = cls
