"""Name -> judge class. ``@register_judge("name")`` on a :class:`Judge` subclass in its own module under
``steps/evaluate/judges/`` adds a judge kind; ``make_judge("name[:<argument>]", **options)`` builds one."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from steps.evaluate.judges.base import Judge, JudgeError, JudgeSettings
from steps.registries import check_name, claim_name

#: The judge ``evaluation.judge`` and ``make_judge`` use when none is named.
DEFAULT_JUDGE = "local_logprob"

_JUDGES: dict[str, type[Judge]] = {}
_SETTINGS_FIELDS = frozenset(f.name for f in dataclasses.fields(JudgeSettings)) - {"extra"}

J = TypeVar("J", bound=type[Judge])


class DuplicateJudgeError(ValueError):
    """Two different judge classes registered under one name."""


def register_judge(name: str) -> Callable[[J], J]:
    """Class decorator: register ``cls`` (a concrete Judge with ``usage`` and ``from_options``) under ``name``."""
    check_name("judge", name)

    def decorate(cls: J) -> J:
        if not (isinstance(cls, type) and issubclass(cls, Judge)) or inspect.isabstract(cls):
            raise TypeError(f"@register_judge({name!r}) must decorate a concrete Judge subclass, got {cls!r}")
        if not cls.usage:
            raise TypeError(f"@register_judge({name!r}): {cls.__name__}.usage must say how the judge is named")
        claim_name(_JUDGES, "judge", name, cls, DuplicateJudgeError)
        cls.name = name
        return cls

    return decorate


def registered_judges() -> tuple[str, ...]:
    """Registered judge names: the default first, then those that need no argument, then the rest."""
    return tuple(sorted(_JUDGES, key=lambda n: (n != DEFAULT_JUDGE, _JUDGES[n].argument_required, n)))


def judge_class(name: str) -> type[Judge]:
    """The class that ``name`` (``kind`` or ``kind:<argument>``) names; JudgeError listing the spellings otherwise."""
    kind = name.partition(":")[0] if isinstance(name, str) else None
    found = _JUDGES.get(kind) if kind is not None else None
    if found is None:
        from steps.config.convert import did_you_mean  # the config's own helper (a top-level import would cycle)

        spellings = [form for judge in registered_judges() for form in _JUDGES[judge].usage]
        listed = ", ".join(spellings[:-1]) + " or " + spellings[-1] if len(spellings) > 1 else spellings[0]
        raise JudgeError(f"unknown judge {name!r}{did_you_mean(kind or '', _JUDGES)}; use {listed}")
    return found


def make_judge(name: str = DEFAULT_JUDGE, **options: Any) -> Judge:
    """The judge ``name`` names, built by its class from ``options``.

    ``options``: the run config's judge knobs (``judge_model``, ``judge_max_chars``, ``judge_base_url``,
    ``judge_api_key_env``, ``judge_max_requests``, ``judge_timeout_s``, ``judge_concurrency``; None = the judge's
    default), how a local judge model runs (``device``, ``dtype``, ``model``, ``tokenizer``, ``show_progress``) and
    keywords for one kind only (e.g. alpaca_eval's annotator options). A judge ignores the knobs it does not use.
    """
    cls = judge_class(name)
    kind, colon, argument = name.partition(":")
    if colon and cls.argument is None:
        raise JudgeError(f"judge {kind!r} takes nothing after ':', got {name!r}")
    settings = {k: v for k, v in options.items() if k in _SETTINGS_FIELDS}
    extra = {k: v for k, v in options.items() if k not in _SETTINGS_FIELDS}
    return cls.from_options(argument if colon else None, JudgeSettings(**settings, extra=extra))
