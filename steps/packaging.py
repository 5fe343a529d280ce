"""The ``steps`` library's files for Metaflow's code package.

Metaflow packages only the flow's own directory, so remote tasks (Argo, Kubernetes) would not find
``steps``. Handing Metaflow the module (``ContentType.MODULE_CONTENT``) is not enough: for a regular
package under a setuptools editable install it packs only ``steps/__init__.py``. Listing every file
explicitly works the same for editable, regular and source-tree imports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

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
