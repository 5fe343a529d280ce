"""What produced an evaluated row, recorded with it (:class:`Provenance`): the alpaca_eval version, the judge (its
endpoint kind, model, annotator config, a hash of the prompt template it sends and every setting that changes a
judgement), the eval set actually used (name, size, a hash of its instructions and reference outputs), the
decoding settings, the evaluation dtype and the versions of the packages that scored it.

Two rows are compared (the join's paired Δ) only when their provenance agrees on everything but
:data:`UNCOMPARED`: AlpacaEval numbers move between alpaca_eval versions (SimPO #44: 0.6.2 vs 0.6.3) and between
judges (SimPO #77: GPT-4o vs GPT-4-Turbo flips DPO vs SimPO), so a difference across either says nothing about the
models. :func:`pairing_refusal` says in words what differs."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steps.evaluate.judges import Judge

#: The package whose version every AlpacaEval row records (its distribution name).
ALPACA_EVAL_DISTRIBUTION = "alpaca-eval"
#: Benchmark packages recorded where installed; a row scored with another version is another benchmark.
BENCHMARK_DISTRIBUTIONS = ("lm_eval", "nvidia-ifbench")
#: Recorded for the reader, not compared: they move floating-point noise, not what is measured (the prompt, the
#: judge, the data and the decoding are compared), and a run's rows all share them anyway.
SOFTWARE_DISTRIBUTIONS = ("prefflow", "transformers", "torch")
#: The fields :func:`pairing_refusal` does not compare.
UNCOMPARED = ("software_versions",)
#: Hex digits of a hash shown in a reason (the full hash is in the row).
SHORT_HASH = 12


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (importlib.metadata), None where it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def sha256_text(texts: Sequence[str]) -> str | None:
    """sha256 (hex) of the UTF-8 text of one prompt template, or of several joined by a NUL in order; None: none."""
    if not texts:
        return None
    return hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()


def eval_set_sha256(instructions: Sequence[str], reference_outputs: Sequence[Mapping[str, Any]]) -> str:
    """sha256 (hex) of the eval set as used: the JSON list of ``[instruction, reference output]`` pairs, in order
    (``json.dumps`` with ``ensure_ascii=False`` and no spaces, UTF-8)."""
    pairs = [[instruction, ref.get("output")] for instruction, ref in zip(instructions, reference_outputs)]
    text = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def installed_versions(distributions: Sequence[str], *, only_installed: bool) -> dict[str, str | None]:
    """``{distribution: version}``; packages that are not installed left out (``only_installed``) or None."""
    versions = {name: package_version(name) for name in distributions}
    return {k: v for k, v in versions.items() if v is not None} if only_installed else versions


@dataclass(frozen=True)
class Provenance:
    """What produced one evaluated row. ``judge_endpoint``: ``local`` (a model on this machine), ``served`` (an
    OpenAI-compatible server) or ``alpaca_eval`` (its annotator); ``judge_settings``: everything that changes a
    judgement (the judge's cache identity); ``decoding``: how the answers were sampled (the generation settings and
    the backend); ``benchmark_versions``: installed benchmark packages; ``software_versions``: recorded only."""

    alpaca_eval_version: str | None
    annotator_config: str | None
    annotator_prompt_sha256: str | None
    judge_endpoint: str
    judge_model: str | None
    judge_settings: str
    eval_set: str
    eval_set_size: int
    eval_set_sha256: str
    decoding: dict[str, Any]
    eval_dtype: str | None
    benchmark_versions: dict[str, str | None]
    software_versions: dict[str, str | None]

    @property
    def judge(self) -> str:
        """``local:<model>``, ``served:<model>``, ``alpaca_eval:<model>``."""
        return f"{self.judge_endpoint}:{self.judge_model}"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values, in field order (metrics.json's ``provenance``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Provenance | None:
        """The provenance an older run's plain row (metrics.json's ``provenance``) holds; None where it has none or
        it is malformed (such a row is then treated as one without provenance)."""
        if not isinstance(data, Mapping):
            return None
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (KeyError, TypeError):
            return None

    def differences(self, other: Provenance) -> list[str]:
        """What differs from ``other`` in the compared fields (all but :data:`UNCOMPARED`; a field added later is
        compared too), in words, this row's value first. Judge settings are named only when the judge is the same."""
        covered = {name for _, names, _ in _ASPECTS for name in names} | set(UNCOMPARED)
        rest = [(f"{f.name} differs", (f.name,), _values_text) for f in fields(self) if f.name not in covered]
        out: list[str] = []
        for label, names, text in [*_ASPECTS, *rest]:
            mine, theirs = tuple(getattr(self, n) for n in names), tuple(getattr(other, n) for n in names)
            if mine == theirs or (names == ("judge_settings",) and self.judge != other.judge):
                continue
            out.append(
                f"{label} ({text(mine)} vs {text(theirs)})"
                if text
                else f"{label} ({_dict_difference(mine[0], theirs[0])})"
            )
        return out


def _values_text(values: tuple[Any, ...]) -> str:
    """One field's value as a reason shows it (a sha256 cut to :data:`SHORT_HASH` digits)."""
    (value,) = values
    text = str(value)
    is_hash = len(text) == 64 and all(c in "0123456789abcdef" for c in text)
    return text[:SHORT_HASH] if is_hash else text


def _judge_text(values: tuple[Any, ...]) -> str:
    endpoint, model = values
    return f"{endpoint}:{model}"


def _eval_set_text(values: tuple[Any, ...]) -> str:
    name, size, digest = values
    return f"{name}, {size} instructions, sha256 {str(digest)[:SHORT_HASH]}"


#: The compared fields, grouped as a reason names them, in the order it lists them; each with how its values read
#: (None: a mapping, of which only the keys that differ are named).
_ASPECTS: tuple[tuple[str, tuple[str, ...], Any], ...] = (
    ("judge differs", ("judge_endpoint", "judge_model"), _judge_text),
    ("judge settings differ", ("judge_settings",), _values_text),
    ("alpaca_eval version differs", ("alpaca_eval_version",), _values_text),
    ("annotator config differs", ("annotator_config",), _values_text),
    ("annotator prompt differs", ("annotator_prompt_sha256",), _values_text),
    ("evaluation dtype differs", ("eval_dtype",), _values_text),
    ("eval set differs", ("eval_set", "eval_set_size", "eval_set_sha256"), _eval_set_text),
    ("decoding differs", ("decoding",), None),
    ("benchmark versions differ", ("benchmark_versions",), None),
)


def _dict_difference(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> str:
    """``temperature 0.7 vs 0.9, seed 1 vs 2``: the keys whose values differ (a missing key reads ``none``)."""
    keys = [k for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]
    return ", ".join(f"{k} {_none(mine.get(k))} vs {_none(theirs.get(k))}" for k in keys)


def _none(value: Any) -> str:
    return "none" if value is None else str(value)


def pairing_refusal(row: Provenance | None, baseline: Provenance | None, baseline_name: str) -> str | None:
    """Why a row may not be paired with the baseline row (None: it may). Rows that both lack a provenance (runs
    from before it was recorded) pair as they always did; one without and one with never pair."""
    if row is None and baseline is None:
        return None
    if row is None or baseline is None:
        which = "this row" if row is None else f"baseline {baseline_name}"
        return f"not paired with {baseline_name}: {which} has no provenance record (evaluated before it was recorded)"
    differences = row.differences(baseline)
    return f"not paired with {baseline_name}: {'; '.join(differences)}" if differences else None


#: What a judge-free benchmark's score does not depend on: the judge and the AlpacaEval eval set.
JUDGE_FIELDS = (
    "alpaca_eval_version",
    "annotator_config",
    "annotator_prompt_sha256",
    "judge_endpoint",
    "judge_model",
    "judge_settings",
    "eval_set",
    "eval_set_size",
    "eval_set_sha256",
)


def benchmark_pairing_refusal(row: Provenance | None, baseline: Provenance | None, baseline_name: str) -> str | None:
    """Why a judge-free benchmark score (IFBench: answers checked by code) may not be paired with the baseline's:
    only how the answers were made counts (decoding, eval dtype, benchmark versions), not the judge or eval set."""
    if row is None or baseline is None:
        return pairing_refusal(row, baseline, baseline_name)
    same_judge = replace(row, **{name: getattr(baseline, name) for name in JUDGE_FIELDS})
    return pairing_refusal(same_judge, baseline, baseline_name)


def build_provenance(
    judge: Judge,
    eval_set_name: str,
    instructions: Sequence[str],
    reference_outputs: Sequence[Mapping[str, Any]],
    generation: Mapping[str, Any],
) -> Provenance:
    """The provenance of a row judged by ``judge`` on ``instructions`` against ``reference_outputs``, answered as
    ``generation`` records (the settings, then ``backend`` and the resolved ``dtype``)."""
    from steps.evaluate.settings import GenerationSettings

    protocol = judge.protocol()
    decoding_keys = [f.name for f in fields(GenerationSettings)] + ["do_sample", "backend"]
    return Provenance(
        alpaca_eval_version=package_version(ALPACA_EVAL_DISTRIBUTION),
        annotator_config=protocol.annotator_config,
        annotator_prompt_sha256=sha256_text(protocol.prompt_templates),
        judge_endpoint=protocol.endpoint,
        judge_model=protocol.model,
        judge_settings=judge.cache_identity,
        eval_set=eval_set_name,
        eval_set_size=len(instructions),
        eval_set_sha256=eval_set_sha256(instructions, reference_outputs),
        decoding={k: generation[k] for k in decoding_keys if k in generation},
        eval_dtype=generation.get("dtype"),
        benchmark_versions=installed_versions(BENCHMARK_DISTRIBUTIONS, only_installed=True),
        software_versions=installed_versions(SOFTWARE_DISTRIBUTIONS, only_installed=False),
    )
