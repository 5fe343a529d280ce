"""Which rows a report shows and how it groups them (``python -m steps.report --filter KEY=VALUE --group-by KEY``).

A key is a row's exported field (results.json's row keys: ``loss_function``, ``variant``, ``judge``, ``eval_set``,
``eval_dtype``, the provenance fields ``alpaca_eval_version``, ``judge_endpoint``, ``judge_model``,
``annotator_prompt_sha256``, ``eval_set_sha256``, ...), one of :data:`ALIASES`, or a dotted key into a mapping field
(``decoding.temperature``, ``benchmark_versions.nvidia-ifbench``, ``software_versions.torch``). Values compare as
text, case-insensitively, and as numbers where both sides are numbers (``0.9`` matches ``0.90``); ``n/a`` matches a
missing value."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from steps.report.records import ReportError
from steps.report.rows import MISSING, ResultRow

#: Short names for row fields.
ALIASES = {"loss": "loss_function", "dtype": "eval_dtype", "endpoint": "judge_endpoint"}
#: Row fields a key may name: what the row exports (fields kept out of its repr are not part of the report).
KEYS = tuple(f.name for f in fields(ResultRow) if f.repr)


def resolve_key(key: str, option: str) -> tuple[str, str | None]:
    """``(field, sub-key)`` of ``key`` (``decoding.temperature`` -> ``("decoding", "temperature")``); a ReportError
    naming ``option`` and the keys there are otherwise."""
    head, dot, rest = key.strip().partition(".")
    field = ALIASES.get(head, head)
    if field not in KEYS or (dot and not rest):
        listed = ", ".join([*KEYS, *ALIASES])
        raise ReportError(
            f"{option}: unknown key {key!r}; use a row field ({listed}) or FIELD.KEY for a mapping such as "
            f"decoding.temperature"
        )
    return field, rest if dot else None


def row_value(row: ResultRow, key: str, option: str = "--filter") -> Any:
    """The value ``key`` names in ``row`` (None where the row lacks it)."""
    field, sub = resolve_key(key, option)
    value = getattr(row, field)
    if sub is None:
        return value
    return value.get(sub) if isinstance(value, Mapping) else None


def value_text(value: Any) -> str:
    """A value as the report names it: ``n/a`` for missing, ``true``/``false``, numbers in their shortest form."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(value_text(v) for v in value)
    return str(value)


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class RowFilter:
    """``KEY=VALUE``: keep the rows whose ``KEY`` has ``VALUE``."""

    key: str
    value: str

    @classmethod
    def parse(cls, spec: str) -> RowFilter:
        """From ``KEY=VALUE`` (the key checked now, so a typo fails before any run is read)."""
        key, equals, value = spec.partition("=")
        if not equals or not key.strip():
            raise ReportError(f"--filter {spec!r}: expected KEY=VALUE, e.g. --filter judge_endpoint=local")
        resolve_key(key, f"--filter {spec!r}")
        return cls(key.strip(), value.strip())

    def matches(self, row: ResultRow) -> bool:
        text = value_text(row_value(row, self.key))
        wanted, got = _number(self.value), _number(text)
        if wanted is not None and got is not None:
            return wanted == got
        return text.casefold() == self.value.casefold()

    def describe(self) -> str:
        return f"{self.key}={self.value}"


def filter_rows(rows: Sequence[ResultRow], filters: Sequence[RowFilter]) -> list[ResultRow]:
    """The rows every filter keeps, in their order."""
    return [row for row in rows if all(f.matches(row) for f in filters)]


def group_rows(rows: Sequence[ResultRow], key: str) -> list[tuple[str, list[ResultRow]]]:
    """``(value, rows)`` per distinct value of ``key``, in order of first appearance, rows in their order."""
    groups: dict[str, list[ResultRow]] = {}
    for row in rows:
        groups.setdefault(value_text(row_value(row, key, "--group-by")), []).append(row)
    return list(groups.items())


def select_rows(rows: Sequence[ResultRow], row_filters: Sequence[str], group_by: str | None) -> list[ResultRow]:
    """The rows a report shows: those every ``KEY=VALUE`` keeps, group by group where ``group_by`` names a key."""
    kept = filter_rows(rows, [RowFilter.parse(spec) for spec in row_filters])
    if group_by is None:
        return kept
    resolve_key(group_by, f"--group-by {group_by!r}")
    return [row for _, group in group_rows(kept, group_by) for row in group]
