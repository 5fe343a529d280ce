"""Sweep files: one loss and a grid of preference keys, expanded to named grid points, e.g.
``loss: simpo`` and ``grid: {criterion_config.beta: [2.0, 2.5], criterion_config.gamma: [0.3, 0.5]}``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from os import PathLike
from typing import Any

from steps.config.convert import ConfigError, did_you_mean
from steps.config.loading import parse_yaml_text, read_config_text

SWEEP_KEYS = ("loss", "grid")


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: ``points`` are (variant name, {preference key: value}) in grid order."""

    source: str
    loss: str
    points: list[tuple[str, dict[str, Any]]]


def _fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def read_sweep(path: str | PathLike) -> Sweep:
    """The grid of a sweep file; its points are checked against the run config when the run is planned."""
    from steps import losses

    source = str(path)
    raw = parse_yaml_text(read_config_text(path), source)
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(source, str(key), f"unknown key{did_you_mean(key, SWEEP_KEYS)}; allowed keys: loss, grid")
    loss, names = raw.get("loss"), losses.registered_losses()
    if loss not in names:
        raise ConfigError(
            source, "loss", f"got {loss!r}{did_you_mean(str(loss), names)}; registered: {', '.join(names)}"
        )
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(source, "grid", f"got {grid!r}; expected a mapping of preference keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(source, f"grid.{key}", f"got {values!r}; expected a non-empty list")
    keys = [str(k) for k in grid]
    points = []
    for combo in itertools.product(*grid.values()):
        name = loss + "".join(f"-{k.split('.')[-1]}{_fmt_value(v)}" for k, v in zip(keys, combo))
        points.append((name, dict(zip(keys, combo))))
    return Sweep(source, loss, points)
