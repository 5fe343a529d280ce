"""Name → loss class. ``@register_loss("name")`` on a ``PreferenceLoss`` subclass in its own module adds a loss."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from steps.losses.base import DATA_KINDS, LossConfigError, PreferenceLoss, UnknownLossError
from steps.registries import check_name, claim_name

_LOSSES: dict[str, type[PreferenceLoss]] = {}

L = TypeVar("L", bound=type[PreferenceLoss])


class DuplicateLossError(ValueError):
    """Two different losses registered under one name."""


def register_loss(name: str) -> Callable[[L], L]:
    """Class decorator: register ``cls`` under ``name``; its ``config_class`` must be a dataclass with defaults."""
    check_name("loss", name)

    def decorate(cls: L) -> L:
        if not (isinstance(cls, type) and issubclass(cls, PreferenceLoss)):
            raise TypeError(f"@register_loss({name!r}) must decorate a PreferenceLoss subclass, got {cls!r}")
        config_class = getattr(cls, "config_class", None)
        if config_class is None or not dataclasses.is_dataclass(config_class):
            raise TypeError(f"@register_loss({name!r}): {cls.__name__}.config_class must be a dataclass")
        no_default = [
            f.name
            for f in dataclasses.fields(config_class)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if no_default:
            raise TypeError(
                f"@register_loss({name!r}): every field of {cls.config_class.__name__} needs a default; "
                f"missing for {no_default}"
            )
        if cls.data_kind not in DATA_KINDS:
            raise TypeError(
                f"@register_loss({name!r}): {cls.__name__}.data_kind = {cls.data_kind!r}; must be one of {DATA_KINDS}"
            )
        claim_name(_LOSSES, "loss", name, cls, DuplicateLossError)
        cls.name = name
        return cls

    return decorate


def registered_losses() -> tuple[str, ...]:
    """Registered loss names, sorted."""
    return tuple(sorted(_LOSSES))


def loss_class(name: str) -> type[PreferenceLoss]:
    """The class registered as ``name`` (case and surrounding spaces ignored); UnknownLossError otherwise."""
    found = _LOSSES.get(name.strip().lower()) if isinstance(name, str) else None
    if found is None:
        raise UnknownLossError(
            f"unknown loss {name!r}; registered losses: {', '.join(registered_losses())}. "
            "Add one with @register_loss(name) in a module under steps/losses/."
        )
    return found


def requires_reference(name: str) -> bool:
    """Whether the trainer must provide reference log-probs for this loss."""
    return loss_class(name).requires_reference


def data_kind(name: str) -> str:
    """What the loss trains on: ``"pairs"`` (preference pairs) or ``"unpaired"`` (labelled single responses)."""
    return loss_class(name).data_kind


def build_loss(name: str, config: Any = None, **fields: Any) -> PreferenceLoss:
    """The loss ``name`` with ``config`` (an instance of its config class), or its defaults updated by ``fields``."""
    cls = loss_class(name)
    if config is None:
        known = [f.name for f in dataclasses.fields(cls.config_class)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise LossConfigError(
                unknown[0],
                f"unknown field(s) {', '.join(map(repr, unknown))} for loss "
                f"{cls.name!r}; {cls.config_class.__name__} fields: {', '.join(known)}",
            )
        config = cls.config_class(**fields)
    elif fields:
        raise TypeError("build_loss(name, config) or build_loss(name, **fields), not both")
    elif not isinstance(config, cls.config_class):
        raise LossConfigError(
            "criterion_config",
            f"loss {cls.name!r} needs a {cls.config_class.__module__}."
            f"{cls.config_class.__qualname__}, got {type(config).__qualname__}",
        )
    return cls(config)


def import_loss_modules(package_name: str) -> list[str]:
    """Import every module of a package so its ``@register_loss`` decorators run; returns the module names."""
    package = importlib.import_module(package_name)
    names = [f"{package_name}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    for module_name in names:
        importlib.import_module(module_name)
    return names
