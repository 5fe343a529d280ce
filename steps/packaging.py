"""The ``steps`` library's files for Metaflow's code package (which ships only the flow's directory).
Every file is listed explicitly: MODULE_CONTENT packs only ``__init__.py`` under an editable install."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

LIBRARY_ROOT = Path(__file__).resolve().parent
SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = {".pyc", ".pyo"}


def library_files() -> Iterator[tuple[str, str]]:
    """``(absolute path, archive name)`` for every file of the ``steps`` package, e.g. ``steps/io.py``."""
    for path in sorted(LIBRARY_ROOT.rglob("*")):
        rel = path.relative_to(LIBRARY_ROOT)
        if path.is_dir() or SKIPPED_DIRS & set(rel.parts) or path.suffix in SKIPPED_SUFFIXES:
            continue
        yield str(path), str(Path(LIBRARY_ROOT.name, rel))
