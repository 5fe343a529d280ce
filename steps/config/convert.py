"""Typed YAML <-> dataclass conversion for run configs: one converter, one error type.

Every error names the dotted key, the bad value and what is allowed (with a did-you-mean for typos)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Field metadata: not a YAML key (set by code, skipped by ``to_dict``).
INTERNAL = {"internal": True}
#: Field metadata: a dataclass value is written with fairseq2's ``_type_`` tag (the loss's config class).
TYPE_TAGGED = {"type_tagged": True}

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A run config is invalid: ``source`` is the file (or ``--set``, ``--loss``), ``key`` the dotted key path."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(part for part in (self.source, self.key, self.message) if part)

    def within(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` in front of its key (for errors raised relative to a section)."""
        return ConfigError(self.source, join_key(prefix, self.key), self.message)

    def located(self, source: str) -> ConfigError:
        """The same error attributed to ``source`` unless it already names one."""
        return self if self.source else ConfigError(source, self.key, self.message)


#: Notes already logged in this process (a section resolved for several losses repeats its notes).
_NOTED: set[str] = set()


def require(cond: bool, key: str, message: str) -> None:
    """Raise a ConfigError at ``key`` (relative to the section being checked) unless ``cond`` holds."""
    if not cond:
        raise ConfigError("", key, message)


def note(key: str, message: str) -> None:
    """Log a one-line note about config key ``key`` (accepted, but worth knowing), once per process."""
    line = " ".join((f"{key}: {message}" if key else message).split())
    if line not in _NOTED:
        _NOTED.add(line)
        logger.warning("config note: %s", line)


def join_key(prefix: str, key: str) -> str:
    if not prefix or not key:
        return prefix or key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def key_text(key: Any) -> str:
    """A mapping key as an error names it: plain strings as they are, anything else (empty, padded, a number,
    null) as its repr, so the key is visible in the message."""
    return key if isinstance(key, str) and key.strip() == key and key else repr(key)


def did_you_mean(word: str, options: Iterable[str]) -> str:
    found = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {found[0]!r}?)" if found else ""


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def yaml_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a config dataclass that YAML may set."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` from YAML as ``tp``, or ConfigError at ``key`` saying what is allowed."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return convert_value(value, arg, key)
                except ConfigError:
                    pass
        raise ConfigError("", key, f"got {short(value)}; expected {type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                "", key, f"got {short(value)}{did_you_mean(value, allowed)}; allowed: {', '.join(map(repr, allowed))}"
            )
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError("", key, f"got {short(value)}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError("", key, f"got {short(value)}; expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-7 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError("", key, f"got {short(value)}; expected a number")
        if not math.isfinite(float(value)):
            raise ConfigError("", key, f"got {short(value)}; expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError("", key, f"got {short(value)}; expected a string")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError("", key, f"got {short(value)}; expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [convert_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError("", key, f"got {short(value)}; expected a list of {len(args)} values")
        return tuple(convert_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError("", key, f"got {short(value)}; expected a mapping")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {
            convert_value(k, key_tp, key): convert_value(v, value_tp, join_key(key, str(k))) for k, v in value.items()
        }
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def convert_fields(cls: type, value: Any, key: str = "") -> dict[str, Any]:
    """Typed keyword arguments for ``cls`` from a YAML mapping that sets some of its fields."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError("", key, f"got {short(value)}; expected a mapping with keys of {cls.__name__}")
    fields = yaml_fields(cls)
    unknown = [k for k in value if k not in fields]
    if unknown:
        bad = key_text(unknown[0])
        raise ConfigError(
            "", join_key(key, bad), f"unknown key{did_you_mean(bad, fields)}; allowed keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    out = {}
    for name, val in value.items():  # a loop, not a comprehension: one call less between a YAML value and its type
        out[name] = convert_value(val, hints[name], join_key(key, name))
    return out


@contextlib.contextmanager
def errors_at(key: str) -> Iterator[None]:
    """Errors of a constructor or ``check`` run inside, with ``key`` in front of the field they name.

    Config sections raise ConfigError relative to themselves; loss configs and GenerationSettings raise
    ValueErrors with a ``field`` attribute. Both come out as ConfigError at the full dotted key.
    """
    try:
        yield
    except ConfigError as exc:
        raise exc.within(key) from None
    except ValueError as exc:
        field = getattr(exc, "field", None)
        if field is None:
            raise
        raise ConfigError("", join_key(key, str(field)), str(exc)) from exc


def construct(factory: Callable[[], T], key: str) -> T:
    """``factory()`` (a constructor or ``check``) with its errors at ``key`` (see ``errors_at``)."""
    with errors_at(key):
        return factory()


def checked(obj: T, key: str = "", label: str | None = None) -> T:
    """``obj`` after its own ``check()`` (the section's range and consistency rules), errors at ``key``; then
    its ``notes()`` ((field, message) pairs: accepted values worth a word) are logged under ``label`` or ``key``."""
    check = getattr(obj, "check", None)
    if check is not None:
        construct(check, key)
    notes = getattr(obj, "notes", None)
    if notes is not None:
        for field_name, message in notes():
            note(join_key(key if label is None else label, field_name), message)
    return obj


def build(cls: type[T], value: Any, key: str = "", extra: Mapping[str, Any] | None = None) -> T:
    """A checked ``cls`` from a YAML mapping; ``extra`` sets internal fields."""
    kwargs = convert_fields(cls, value, key)
    kwargs.update(extra or {})
    with errors_at(key):
        obj = cls(**kwargs)
    return checked(obj, key)


def from_dict(cls: type[T], value: Any, source: str, key: str = "", extra: Mapping[str, Any] | None = None) -> T:
    """``build`` with errors attributed to ``source`` (a file, ``--set``, ...)."""
    try:
        return build(cls, value, key, extra)
    except ConfigError as exc:
        raise exc.located(source) from None


def to_dict(obj: Any) -> Any:
    """A config dataclass as plain YAML/JSON values (tuples as lists, loss configs tagged with ``_type_``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            out[f.name] = to_dict(value)
            if f.metadata.get("type_tagged") and dataclasses.is_dataclass(value):
                out[f.name] = {"_type_": f"{type(value).__module__}.{type(value).__qualname__}", **out[f.name]}
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
