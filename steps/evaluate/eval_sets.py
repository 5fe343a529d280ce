"""Instruction sets to evaluate on: AlpacaEval (Hub or a local copy), a JSON file, or the small embedded set;
records keep the file's order, since alpaca_eval's LC GLM reads a row's position as its instruction index."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.io import read_json

logger = logging.getLogger(__name__)

EMBEDDED_EVAL_SET = Path(__file__).with_name("embedded_eval_set.json")
EMBEDDED_DATASET = "prefflow_embedded"
ALPACA_EVAL_HUB_ID = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_HUB_CONFIG = "alpaca_eval_gpt4_baseline"
#: The AlpacaEval set has 805 instructions drawn from these five sources, in a fixed order.
ALPACA_EVAL_SIZE = 805
ALPACA_EVAL_SOURCES = frozenset({"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"})
REQUIRED_FIELDS = ("instruction", "output", "generator", "dataset")


class EvalSetError(ValueError):
    """An eval set spec or file that cannot be used (unreachable, malformed, missing fields)."""


@dataclass
class EvalSet:
    """Instructions to evaluate, optionally with reference outputs (``output`` None when there are none).

    ``alpaca_eval_order`` is True when row i is AlpacaEval instruction i, i.e. when alpaca_eval's
    per-instruction difficulty (indexed by position) applies to these rows.
    """

    name: str
    records: list[dict[str, Any]]
    subset: bool = False
    reference_generator: str | None = None
    alpaca_eval_order: bool = False
    source: str = ""
    n_available: int = field(default=0)

    @property
    def instructions(self) -> list[str]:
        return [r["instruction"] for r in self.records]

    @property
    def has_outputs(self) -> bool:
        return bool(self.records) and all(r.get("output") is not None for r in self.records)

    def __len__(self) -> int:
        return len(self.records)


def load_eval_set(spec: str, max_instructions: int | None = None) -> EvalSet:
    """``"alpaca_eval"`` (Hub), ``"embedded"`` (the packaged small set) or a path to a JSON list of records.

    ``max_instructions`` takes a prefix, never a sample, and marks the set as a subset so the LC label says so.
    """
    spec = str(spec)
    if spec == "alpaca_eval":
        records = _records_from_hub()
        name, source = "alpaca_eval", f"hf://{ALPACA_EVAL_HUB_ID}/{ALPACA_EVAL_HUB_CONFIG}"
        records = _validate(records, source, REQUIRED_FIELDS)
    elif spec == "embedded":
        records = _validate(_read_json(EMBEDDED_EVAL_SET), str(EMBEDDED_EVAL_SET), ("instruction",))
        for record in records:
            record.setdefault("output", None)
            record.setdefault("generator", None)
            record.setdefault("dataset", EMBEDDED_DATASET)
        name, source = EMBEDDED_DATASET, str(EMBEDDED_EVAL_SET)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise EvalSetError(
                f"eval set {spec!r} is neither 'alpaca_eval', 'embedded' nor an existing JSON file; "
                f"give a path to a JSON list of records with fields {', '.join(REQUIRED_FIELDS)}"
            )
        records = _validate(_read_json(path), str(path), REQUIRED_FIELDS)
        name, source = path.stem, str(path)

    n_available = len(records)
    subset = False
    if max_instructions is not None:
        if max_instructions < 1:
            raise EvalSetError(f"max_instructions must be >= 1, got {max_instructions}")
        subset = max_instructions < n_available
        records = records[:max_instructions]
    generators = sorted({str(r.get("generator")) for r in records if r.get("output") is not None})
    reference_generator = generators[0] if len(generators) == 1 else None
    if len(generators) > 1:
        logger.warning("%s: reference outputs come from several generators %s", source, generators)
        reference_generator = "mixed:" + ",".join(generators)
    eval_set = EvalSet(
        name=name,
        records=records,
        subset=subset,
        reference_generator=reference_generator,
        alpaca_eval_order=_looks_like_alpaca_eval(records, n_available),
        source=source,
        n_available=n_available,
    )
    logger.info(
        "eval set %s: %d of %d instructions from %s%s",
        name,
        len(records),
        n_available,
        source,
        " (subset)" if subset else "",
    )
    return eval_set


def _looks_like_alpaca_eval(records: list[dict[str, Any]], n_available: int) -> bool:
    """The AlpacaEval 805 in their order (or a prefix of them): same size and only AlpacaEval's five sources."""
    return n_available == ALPACA_EVAL_SIZE and all(r.get("dataset") in ALPACA_EVAL_SOURCES for r in records)


def _records_from_hub() -> list[dict[str, Any]]:
    try:
        import datasets

        data = datasets.load_dataset(ALPACA_EVAL_HUB_ID, ALPACA_EVAL_HUB_CONFIG)["eval"]
    except Exception as exc:  # offline, no cache, hub errors: all mean "use a local file"
        raise EvalSetError(
            f"could not load {ALPACA_EVAL_HUB_ID} ({ALPACA_EVAL_HUB_CONFIG}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {exc}. Offline, pass a local JSON file of the eval set instead "
            f"(records with {', '.join(REQUIRED_FIELDS)}), e.g. a copy of AlpacaEval's eval set, or 'embedded'."
        ) from exc
    return [dict(row) for row in data]


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except json.JSONDecodeError as exc:
        raise EvalSetError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc


def _validate(records: Any, source: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """A non-empty list of objects, each with every required field (``instruction`` a non-empty string)."""
    if not isinstance(records, list):
        raise EvalSetError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise EvalSetError(f"{source}: the eval set is empty")
    out = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise EvalSetError(f"{source}: record {index} is a {type(record).__name__}, expected an object")
        for key in required:
            if key not in record:
                raise EvalSetError(
                    f"{source}: record {index} has no field {key!r} (it has {sorted(record)}); every record needs "
                    f"{', '.join(required)}"
                )
        if not isinstance(record["instruction"], str) or not record["instruction"].strip():
            raise EvalSetError(f"{source}: record {index} field 'instruction' must be a non-empty string")
        if "output" in record and record["output"] is not None and not isinstance(record["output"], str):
            raise EvalSetError(f"{source}: record {index} field 'output' must be a string or null")
        out.append(dict(record))
    return out
