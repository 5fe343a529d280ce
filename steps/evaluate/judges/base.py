"""What every pairwise judge is: the interface (alpaca_eval's annotation fields, preference in [1, 2]), the options
``make_judge`` hands a judge class to build itself from, and the judges' error. Kept apart so that judge modules and
the annotation cache can import it without importing each other."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class JudgeError(ValueError):
    """A judge that cannot be made or cannot run (unknown name, missing key or package, bad template)."""


@dataclass(frozen=True)
class JudgeSettings:
    """Everything ``make_judge`` was given besides the name; each judge class reads what it uses.

    The first seven are the run config's ``evaluation.judge_*`` knobs (``steps.evaluate.settings.JUDGE_OPTIONS``);
    None means the judge's own default, which its module owns. ``device``, ``dtype``, ``model``, ``tokenizer`` and
    ``show_progress`` say how a local judge model runs. ``extra``: every other keyword, for the judge kind that
    takes it (alpaca_eval's annotator options, a served judge's protocol and retry tuning).
    """

    judge_model: str | None = None
    judge_max_chars: int | None = None
    judge_base_url: str | None = None
    judge_api_key_env: str | None = None
    judge_max_requests: int | None = None
    judge_timeout_s: float | None = None
    judge_concurrency: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    model: Any = None
    tokenizer: Any = None
    show_progress: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)


#: Endpoint kinds a row's provenance names (``Provenance.judge_endpoint``).
ENDPOINT_LOCAL = "local"
ENDPOINT_SERVED = "served"
ENDPOINT_ALPACA_EVAL = "alpaca_eval"


@dataclass(frozen=True)
class JudgeProtocol:
    """Where a judge's preferences come from, as a row's provenance records it: the kind of endpoint (local model,
    served OpenAI-compatible model, alpaca_eval annotator), the model that judges, the alpaca_eval annotator config
    (name or path) and the text of each prompt template it sends (hashed into the provenance, never stored)."""

    endpoint: str
    model: str | None
    annotator_config: str | None
    prompt_templates: tuple[str, ...] = ()


class Judge(abc.ABC):
    """Judges (instruction, output_1, output_2) pairs; results carry ``preference`` in [1, 2] plus raw fields.

    A judge kind registers with ``@register_judge(name)`` (steps.evaluate.judges.registry) and says how it is
    written and built: ``argument`` names what may follow ``name:`` (None: nothing may), ``argument_required``
    whether it must, ``usage`` the spellings listed when a name is unknown, and ``from_options`` builds it.
    """

    name: str = ""
    argument: str | None = None
    argument_required: bool = False
    usage: tuple[str, ...] = ()

    @classmethod
    @abc.abstractmethod
    def from_options(cls, argument: str | None, options: JudgeSettings) -> Judge:
        """The judge for ``name:<argument>`` (``argument`` None when the name has no ``:``) and ``options``."""

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """What produced the judgements, recorded with every result (``annotator`` and metadata)."""

    @property
    def cache_identity(self) -> str:
        """Everything that changes a judgement; part of every cache key."""
        return self.label

    @property
    def weak_judge(self) -> bool:
        return False

    @property
    def price_model(self) -> str | None:
        """The model name looked up in the judge price table; None for judges that run locally (no bill)."""
        return None

    def check(self) -> None:  # noqa: B027  (optional hook: most judges have nothing to check)
        """Raise JudgeError now if the judge cannot run (called before any generation starts)."""

    @abc.abstractmethod
    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        """Judge each pair, calling ``on_result(index, result)`` as soon as each result exists."""

    def protocol(self) -> JudgeProtocol:
        """What a row's provenance records of this judge; a judge kind that sends a prompt overrides it to name its
        endpoint, model and template (this default names the kind alone, with no model and no prompt)."""
        return JudgeProtocol(endpoint=self.name or type(self).__name__, model=None, annotator_config=None)

    def metadata(self) -> dict[str, Any]:
        return {"judge": self.label, "weak_judge": self.weak_judge}
