"""``--set key.path=value`` overrides: parsed as YAML values, applied to the config mapping before it is typed."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import yaml

from steps.config.convert import ConfigError

#: Where override errors point (the flow's parameter).
SET_SOURCE = "--set"


def parse_overrides(text: str | list[str] | None) -> dict[str, Any]:
    """``"preference.criterion_config.beta=0.5 sft.epochs=2"`` -> {dotted key: YAML-parsed value}."""
    if not text:
        return {}
    items = text if isinstance(text, list) else re.split(r"[\s;]+", text.strip())
    out: dict[str, Any] = {}
    for item in items:
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(SET_SOURCE, item, "expected key.path=value, e.g. preference.criterion_config.beta=0.5")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or exc
            raise ConfigError(SET_SOURCE, key, f"{raw!r} is not a YAML value ({problem})") from None
    return out


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings, creating missing sections; errors are relative to ``data``."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif isinstance(nxt, Mapping) and not isinstance(nxt, dict):
            nxt = node[part] = dict(nxt)
        if not isinstance(nxt, dict):
            raise ConfigError("", ".".join(parts[: i + 1]), f"is {nxt!r}, not a section; cannot set {dotted}")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: Mapping, overrides: Mapping[str, Any]) -> dict:
    """A copy of ``data`` with the overrides set."""
    out = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        try:
            set_path(out, dotted, value)
        except ConfigError as exc:
            raise exc.located(SET_SOURCE) from None
    return out


def blame_overrides(exc: ConfigError, overrides: Mapping[str, Any]) -> ConfigError:
    """``exc`` attributed to ``--set`` when its key is one the overrides set (or lies under one)."""
    for dotted in overrides:
        if exc.key == dotted or exc.key.startswith((dotted + ".", dotted + "[")):
            return ConfigError(SET_SOURCE, exc.key, exc.message)
    return exc
