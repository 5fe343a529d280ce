"""Checks for loss config fields, shared by every config's ``__post_init__``: each coerces the value (ints become
floats) and raises LossConfigError naming the config, the field, the bad value and what is allowed, so a typo in
YAML is caught before any model is loaded."""

from __future__ import annotations

import math
import numbers
from typing import Any

from steps.losses.base import LossConfigError

__all__ = ["check_bool", "check_real", "set_field"]


def set_field(config: Any, name: str, value: Any) -> None:
    """Write a coerced value back, also on frozen dataclasses."""
    object.__setattr__(config, name, value)


def _where(config: Any, name: str) -> str:
    return f"{type(config).__name__}.{name}"


def check_real(
    config: Any,
    name: str,
    *,
    minimum: float | None = None,
    min_inclusive: bool = True,
    maximum: float | None = None,
    max_inclusive: bool = True,
    hint: str = "",
) -> float:
    """Require a finite real number within the given bounds; store it back as a float."""
    value = getattr(config, name)
    allowed = "a finite number"
    if minimum is not None or maximum is not None:
        lower = "" if minimum is None else f"{minimum:g} {'≤' if min_inclusive else '<'} "
        upper = "" if maximum is None else f" {'≤' if max_inclusive else '<'} {maximum:g}"
        allowed += f" with {lower}{name}{upper}"
    suffix = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        extra = ""
        if isinstance(value, str):
            extra = "; YAML reads values such as 5e-7 as strings, write 5.0e-7"
        raise LossConfigError(
            name,
            f"{_where(config, name)} = {value!r} ({type(value).__name__}) is not allowed: "
            f"it must be {allowed}{suffix}{extra}",
        )
    number = float(value)
    bad = not math.isfinite(number)
    if minimum is not None:
        bad = bad or (number < minimum if min_inclusive else number <= minimum)
    if maximum is not None:
        bad = bad or (number > maximum if max_inclusive else number >= maximum)
    if bad:
        raise LossConfigError(name, f"{_where(config, name)} = {value!r} is not allowed: it must be {allowed}{suffix}")
    set_field(config, name, number)
    return number


def check_bool(config: Any, name: str, *, hint: str = "") -> bool:
    """Require a real bool (YAML true/false), not a string or a number."""
    value = getattr(config, name)
    if not isinstance(value, bool):
        suffix = f" ({hint})" if hint else ""
        raise LossConfigError(
            name,
            f"{_where(config, name)} = {value!r} ({type(value).__name__}) is not allowed: "
            f"it must be true or false{suffix}",
        )
    return value
