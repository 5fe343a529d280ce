"""How answers are generated and judged: the settings that travel from the run config to the decoder (validated
once) and to the judge."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, TypedDict


class GenerationError(ValueError):
    """Generation settings or inputs that cannot work; ``field`` names the offending setting."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling knobs of evaluation and reference generation; ``temperature == 0`` means greedy.

    The run config's ``evaluation`` section spells the same names; every consumer (reference outputs,
    model outputs, the continuous-batching decoder, vLLM, the CLI) takes this object.
    """

    max_new_tokens: int = 256
    temperature: float = 0.9
    top_p: float = 1.0
    seed: int = 1814
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationError(f"{name} must be an integer >= 1, got {value!r}", name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise GenerationError(f"seed must be an integer, got {self.seed!r}", "seed")
        if not _finite(self.temperature) or self.temperature < 0:
            raise GenerationError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}", "temperature"
            )
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @classmethod
    def from_config(cls, section: object) -> GenerationSettings:
        """The settings named like this class's fields, read from ``section`` (the config's ``evaluation``, or the
        parsed flags of ``python -m steps.evaluate generate``)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})

    def record(self) -> dict[str, Any]:
        """The settings as written next to generated outputs (``do_sample`` spelled out for readers)."""
        return {**asdict(self), "do_sample": self.do_sample}


#: Where answers are generated: ``auto`` runs vLLM in a subprocess (its GPU memory is back before held-out scoring
#: loads models here) and the HF backend in this process; ``subprocess`` / ``in_process`` force one for both.
GENERATION_PROCESSES = ("auto", "subprocess", "in_process")


@dataclass(frozen=True)
class EngineSettings:
    """How the generating engine runs, as opposed to what it samples (:class:`GenerationSettings`).

    ``gpu_memory_utilization``: the share of the GPU's memory vLLM may take (weights, activations, KV cache).
    ``max_model_len``: the longest sequence (prompt + answer) vLLM reserves for; None = the eval set's longest
    prompt + ``max_new_tokens``, rounded up (see ``steps.evaluate.vllm_engine``). ``process``: one of
    :data:`GENERATION_PROCESSES`. ``timeout_s``: how long a generation subprocess may run before it is killed.
    """

    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    process: str = "auto"
    timeout_s: float = 21600.0

    def __post_init__(self) -> None:
        if not _finite(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise GenerationError(
                f"gpu_memory_utilization must be in (0, 1] (the share of the GPU's memory vLLM may take), "
                f"got {self.gpu_memory_utilization!r}",
                "gpu_memory_utilization",
            )
        if self.max_model_len is not None and (
            isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise GenerationError(
                f"max_model_len must be an integer >= 2 or null (computed from the eval set), got "
                f"{self.max_model_len!r}",
                "max_model_len",
            )
        if self.process not in GENERATION_PROCESSES:
            raise GenerationError(
                f"generation_process must be one of {', '.join(GENERATION_PROCESSES)}, got {self.process!r}",
                "generation_process",
            )
        if not _finite(self.timeout_s) or self.timeout_s <= 0:
            raise GenerationError(
                f"generation_timeout_s must be a number of seconds > 0, got {self.timeout_s!r}", "generation_timeout_s"
            )

    def in_subprocess(self, backend: str) -> bool:
        """Whether ``backend`` (``hf`` or ``vllm``, already resolved) generates in a subprocess."""
        return self.process == "subprocess" or (self.process == "auto" and backend == "vllm")


class JudgeOptions(TypedDict, total=False):
    """The judge knobs that the run config, the CLI and ``evaluate_model`` hand to ``make_judge`` as keywords."""

    judge_model: str | None
    judge_max_chars: int | None
    judge_base_url: str | None
    judge_api_key_env: str | None
    judge_max_requests: int | None
    judge_timeout_s: float | None
    judge_concurrency: int | None


#: The keys of :class:`JudgeOptions` in order; the config's ``evaluation`` section has a field of each name.
JUDGE_OPTIONS: tuple[str, ...] = tuple(JudgeOptions.__annotations__)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
