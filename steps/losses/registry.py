"""Name → loss registry. ``@register_loss("name")`` in a loss's own module is all it takes to add a loss.

Two shapes are accepted:

* a ``PreferenceLoss`` subclass with class attributes ``config_class`` (a dataclass) and
  ``requires_reference``;
* a function ``fn(pairs: PreferencePairs, config) -> LossTerms`` registered with
  ``@register_loss("name", config=MyConfig, requires_reference=False)``.

``get_loss(name, **fields)`` builds the config from keyword fields (unknown fields are refused with the list
of known ones) and returns a callable loss object.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from steps.losses.base import LossConfigError, LossTerms, PreferenceLoss, PreferencePairs, UnknownLossError

__all__ = [
    "LOSSES",
    "DuplicateLossError",
    "LossEntry",
    "config_type_path",
    "get_loss",
    "import_loss_modules",
    "loss_config_class",
    "loss_from_config",
    "register_loss",
    "registered_losses",
    "requires_reference",
    "unregister_loss",
]

logger = logging.getLogger(__name__)

_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]*$")

T = TypeVar("T")


class DuplicateLossError(ValueError):
    """Two different losses registered under one name."""


@dataclass(frozen=True)
class LossEntry:
    """One registered loss: how to build it and what it needs."""

    name: str
    config_class: type
    loss_class: type[PreferenceLoss]
    requires_reference: bool
    source: str  # "module.qualname" of the decorated object, to tell a re-import from a clash

    def build(self, config: Any) -> PreferenceLoss:
        return self.loss_class(config)


_REGISTRY: dict[str, LossEntry] = {}
LOSSES: Mapping[str, LossEntry] = MappingProxyType(_REGISTRY)


def _make_function_loss(
    name: str, function: Callable[[PreferencePairs, Any], LossTerms], config_class: type, needs_reference: bool
) -> type[PreferenceLoss]:
    """Wrap ``fn(pairs, config) -> LossTerms`` into a PreferenceLoss subclass."""

    def compute(self: PreferenceLoss, pairs: PreferencePairs) -> LossTerms:
        return function(pairs, self.config)

    return type(
        f"{function.__name__}_loss",
        (PreferenceLoss,),
        {
            "config_class": config_class,
            "requires_reference": needs_reference,
            "compute": compute,
            "__doc__": function.__doc__,
            "__module__": function.__module__,
        },
    )


def register_loss(
    name: str, *, config: type | None = None, requires_reference: bool | None = None
) -> Callable[[T], T]:
    """Decorator adding a loss class or function to the registry under ``name`` (lower-case)."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ValueError(f"loss name {name!r} must be lower-case letters, digits, '_' or '-', starting with a letter")

    def decorate(target: T) -> T:
        source = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
        if inspect.isclass(target):
            if not issubclass(target, PreferenceLoss):
                raise TypeError(f"@register_loss({name!r}): {target.__name__} must subclass PreferenceLoss")
            config_class = config if config is not None else getattr(target, "config_class", None)
            needs_reference = (
                requires_reference if requires_reference is not None else bool(target.requires_reference)
            )
            loss_class = target
        elif callable(target):
            config_class = config
            if config_class is None:
                raise TypeError(
                    f"@register_loss({name!r}) on function {target.__name__}: pass config=<its config dataclass>"
                )
            needs_reference = bool(requires_reference)
            loss_class = _make_function_loss(name, target, config_class, needs_reference)
        else:
            raise TypeError(f"@register_loss({name!r}) must decorate a PreferenceLoss subclass or a function")
        if config_class is None or not dataclasses.is_dataclass(config_class):
            raise TypeError(f"@register_loss({name!r}): config class must be a dataclass, got {config_class!r}")
        missing_defaults = [
            f.name
            for f in dataclasses.fields(config_class)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing_defaults:
            raise TypeError(
                f"@register_loss({name!r}): every field of {config_class.__name__} needs a default; "
                f"missing for {missing_defaults}"
            )
        if loss_class is target:
            # Subclass attributes are what the base __call__ reads.
            loss_class.config_class = config_class
            loss_class.requires_reference = needs_reference
        loss_class.name = name
        existing = _REGISTRY.get(name)
        if existing is not None and existing.source != source:
            raise DuplicateLossError(
                f"loss name {name!r} is already registered by {existing.source}; {source} must use another name"
            )
        _REGISTRY[name] = LossEntry(
            name=name,
            config_class=config_class,
            loss_class=loss_class,
            requires_reference=needs_reference,
            source=source,
        )
        logger.debug("registered loss %r from %s", name, source)
        return target

    return decorate


def unregister_loss(name: str) -> None:
    """Remove a loss (for tests and plugin reloads); unknown names raise UnknownLossError."""
    _entry(name)
    del _REGISTRY[_normalise(name)]


def registered_losses() -> tuple[str, ...]:
    """Registered loss names, sorted."""
    return tuple(sorted(_REGISTRY))


def _normalise(name: str) -> str:
    if not isinstance(name, str):
        raise UnknownLossError(f"loss name must be a string, got {name!r}; registered: {', '.join(registered_losses())}")
    return name.strip().lower()


def _entry(name: str) -> LossEntry:
    key = _normalise(name)
    entry = _REGISTRY.get(key)
    if entry is None:
        raise UnknownLossError(
            f"unknown loss {name!r}; registered losses: {', '.join(registered_losses())}. "
            "Add one with @register_loss(name) in a module under steps/losses/."
        )
    return entry


def _describe_fields(config_class: type) -> str:
    parts = []
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))
        parts.append(f"{f.name} ({type_name}, default {default!r})")
    return ", ".join(parts) if parts else "(none)"


def loss_config_class(name: str) -> type:
    """The config dataclass of a registered loss (its import path is what YAML ``_type_`` names)."""
    return _entry(name).config_class


def config_type_path(name: str) -> str:
    """Import path of a loss's config class, e.g. ``steps.losses.simpo.SimPOConfig``."""
    config_class = loss_config_class(name)
    return f"{config_class.__module__}.{config_class.__qualname__}"


def requires_reference(name: str) -> bool:
    """Whether the trainer must compute reference log-probs for this loss."""
    return _entry(name).requires_reference


def get_loss(name: str, **fields: Any) -> PreferenceLoss:
    """Build the loss ``name`` with config ``fields``; unknown fields raise LossConfigError listing the known ones."""
    entry = _entry(name)
    known = {f.name for f in dataclasses.fields(entry.config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LossConfigError(
            unknown[0],
            f"unknown field(s) {', '.join(repr(u) for u in unknown)} for loss {entry.name!r}; "
            f"{entry.config_class.__name__} fields: {_describe_fields(entry.config_class)}",
        )
    return entry.build(entry.config_class(**fields))


def loss_from_config(name_or_config: Any, config: Any = None) -> PreferenceLoss:
    """Build a loss from a config instance (e.g. parsed from YAML).

    ``loss_from_config("simpo", SimPOConfig(...))`` checks the config belongs to that loss (None = defaults);
    ``loss_from_config(SimPOConfig(...))`` finds the loss whose config class is ``type(config)``.
    """
    if isinstance(name_or_config, str):
        entry = _entry(name_or_config)
        if config is None:
            config = entry.config_class()
        if not isinstance(config, entry.config_class):
            raise LossConfigError(
                "criterion_config",
                f"loss {entry.name!r} needs a {config_type_path(entry.name)}, got {type(config).__module__}."
                f"{type(config).__qualname__}",
            )
        return entry.build(config)
    if config is not None:
        raise TypeError("loss_from_config(name, config) or loss_from_config(config); got two non-name arguments")
    config = name_or_config
    matches = [entry for entry in _REGISTRY.values() if type(config) is entry.config_class]
    if not matches:
        known = ", ".join(f"{e.name}: {config_type_path(e.name)}" for e in _REGISTRY.values())
        raise UnknownLossError(f"{type(config).__name__} is not the config class of any registered loss ({known})")
    if len(matches) > 1:
        raise UnknownLossError(
            f"{type(config).__name__} is the config class of several losses "
            f"({', '.join(e.name for e in matches)}): use loss_from_config(name, config)"
        )
    return matches[0].build(config)


def import_loss_modules(package_name: str) -> list[str]:
    """Import every module of a package so its ``@register_loss`` decorators run; returns the module names."""
    package = importlib.import_module(package_name)
    imported = []
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.name.startswith("_"):
            continue
        module_name = f"{package_name}.{module_info.name}"
        importlib.import_module(module_name)
        imported.append(module_name)
    return imported
