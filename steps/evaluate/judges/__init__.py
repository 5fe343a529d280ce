"""Pairwise judges in alpaca_eval's format, one module per kind, made by name with ``make_judge``; preference in
[1, 2], 1 = output_1 (reference) wins, 2 = output_2 (model) wins.

- ``local_logprob[:<model spec>]`` (local_logprob.py): a local causal LM shown the official AlpacaEval 2 prompt,
  scored from its "m"/"M" next-token probabilities (the offline default).
- ``openai_compatible[:<served model>]`` (openai_compatible.py): the same prompt sent to a chat-completions server.
- ``alpaca_eval:<annotator config>`` (alpaca_eval.py): alpaca_eval's own annotator with one of its configs.

Adding a judge is one file: a module here with a :class:`Judge` subclass decorated ``@register_judge("name")``
that sets ``usage`` (and ``argument`` if it takes ``name:<argument>``) and builds itself in ``from_options`` from
the evaluation options (:class:`JudgeSettings`). Every module of this package is imported, so the file alone makes
``make_judge("name")`` and ``evaluation.judge: name`` work. Each judge module owns its defaults.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from steps.evaluate.judges.alpaca_eval import AlpacaEvalJudge
from steps.evaluate.judges.base import Judge, JudgeError, JudgeSettings
from steps.evaluate.judges.local_logprob import DEFAULT_JUDGE_MAX_CHARS, LocalLogprobJudge
from steps.evaluate.judges.openai_compatible import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S, ServedJudge
from steps.evaluate.judges.registry import (
    DEFAULT_JUDGE,
    DuplicateJudgeError,
    judge_class,
    make_judge,
    register_judge,
    registered_judges,
)

for _module in _pkgutil.iter_modules(__path__):  # judge modules dropped in here register themselves on import
    _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_JUDGE",
    "DEFAULT_JUDGE_MAX_CHARS",
    "DEFAULT_TIMEOUT_S",
    "AlpacaEvalJudge",
    "DuplicateJudgeError",
    "Judge",
    "JudgeError",
    "JudgeSettings",
    "LocalLogprobJudge",
    "ServedJudge",
    "judge_class",
    "make_judge",
    "register_judge",
    "registered_judges",
]
