"""Raw rows of a preference / instruction data source: a JSONL(.gz) or Parquet file, a directory, or a Hub id.

A directory is read as fairseq2 reads one: the files its ``MANIFEST`` names, else every ``*.jsonl`` under it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from steps.data.jsonl_lines import MalformedLines, is_array_start, is_parquet, open_lines, parse_line
from steps.data.oasst_read import looks_like_hub_id
from steps.data.records import DataError

logger = logging.getLogger(__name__)

DIRECTORY_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.parquet")


class InputNotFoundError(DataError, FileNotFoundError):
    """The input names a local path that does not exist."""


@dataclass
class SourceFiles:
    """What a source resolved to: local files (with MANIFEST weights, which PrefFlow records but does not sample
    by: every file is read once, in order) or one Hub dataset split."""

    spec: str
    files: list[Path] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    hub_id: str | None = None
    manifest: Path | None = None

    def describe(self) -> dict[str, Any]:
        if self.hub_id:
            return {"hub": self.hub_id}
        out: dict[str, Any] = {"files": [str(f) for f in self.files]}
        if self.manifest:
            out["manifest"] = str(self.manifest)
            out["weights"] = self.weights
        return out


def _read_manifest(directory: Path, manifest: Path) -> tuple[list[Path], list[float]]:
    """fairseq2's MANIFEST: one ``relative/path.jsonl<TAB>weight`` per line, read in sorted line order."""
    files, weights = [], []
    for number, line in enumerate(sorted(manifest.read_text(encoding="utf-8").splitlines()), 1):
        if not line.strip():
            continue
        parts = line.rstrip().split("\t")
        if len(parts) != 2 or not parts[0].strip():
            raise DataError(f"{manifest}: line {number} {line!r} must be 'path<TAB>weight' (fairseq2 MANIFEST)")
        path = directory / parts[0].strip()
        if not path.is_file():
            raise InputNotFoundError(f"{manifest}: line {number} names {path}, which does not exist")
        try:
            weight = float(parts[1])
        except ValueError:
            raise DataError(f"{manifest}: line {number}: weight {parts[1]!r} is not a number") from None
        files.append(path)
        weights.append(weight)
    if not files:
        raise DataError(f"{manifest}: names no files; list 'path<TAB>weight' lines or remove it")
    return files, weights


def resolve(spec: str, *, allow_hub: bool = True) -> SourceFiles:
    """Local file, directory (MANIFEST or ``*.jsonl`` / ``*.jsonl.gz`` / ``*.parquet`` below it) or Hub id."""
    path = Path(spec).expanduser()
    if path.is_file():
        return SourceFiles(spec, [path], [1.0])
    if path.is_dir():
        manifest = path / "MANIFEST"
        if manifest.is_file():
            files, weights = _read_manifest(path, manifest)
            return SourceFiles(spec, files, weights, manifest=manifest)
        files = sorted(
            {f for pattern in DIRECTORY_PATTERNS for f in path.rglob(pattern) if f.is_file()},
            key=lambda f: f.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(
                f"{path}: directory without a MANIFEST and without any {', '.join(DIRECTORY_PATTERNS)} "
                "file; point data.input at a file or a directory of JSONL files"
            )
        return SourceFiles(spec, files, [1.0] * len(files))
    if allow_hub and looks_like_hub_id(spec):
        return SourceFiles(spec, hub_id=spec)
    raise InputNotFoundError(
        f"{spec}: no such file or directory; pass a JSONL(.gz) / Parquet file, a directory "
        "of JSONL files (optionally with a fairseq2 MANIFEST), or a Hub dataset id"
    )


def _file_rows(path: Path, malformed: MalformedLines, label: str) -> Iterator[tuple[str, Any]]:
    if is_parquet(path):
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for raw in batch.to_pylist():
                number += 1
                yield f"{label} row {number}", raw
        return
    first = True
    try:
        for lineno, line in enumerate(tqdm(open_lines(path), unit="lines", desc=f"read {path.name}", disable=None), 1):
            if not line.strip():
                continue
            if first and is_array_start(line):  # the whole file is one JSON document
                raise DataError(
                    f"{path}: line {lineno} starts a JSON array; expected JSONL (one JSON object per "
                    "line), e.g. convert with `jq -c '.[]'`"
                )
            first = False
            raw, error = parse_line(line)
            if error is None and not isinstance(raw, dict):
                error = f"expected a JSON object, got {type(raw).__name__}"
            if error:
                malformed.add(lineno, error, where=label)
                continue
            yield f"{label} line {lineno}", raw
    except (OSError, EOFError) as exc:  # truncated gzip, unreadable file
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def iter_rows(source: SourceFiles, malformed: MalformedLines, split: str = "train") -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row, in file order; lines that are not JSON objects go to ``malformed``."""
    if source.hub_id:
        try:
            from datasets import load_dataset

            dataset = load_dataset(source.hub_id, split=split)
        except Exception as exc:  # network, offline mode, unknown id, unknown split: all mean "cannot load"
            raise DataError(
                f"{source.hub_id}: cannot load Hub dataset split {split!r} ({type(exc).__name__}: "
                f"{exc}); check the id and split, unset HF_HUB_OFFLINE if it is not cached, or pass a "
                "local file"
            ) from exc
        number = 0
        for table in dataset.with_format("arrow").iter(batch_size=4096):
            for raw in table.to_pylist():
                number += 1
                yield f"{source.hub_id}[{split}] row {number}", raw
        return
    base = Path(source.spec).expanduser()
    for path in source.files:
        label = path.relative_to(base).as_posix() if base.is_dir() else path.name
        yield from _file_rows(path, malformed, label)
