"""Import IFBench's verifier modules and run them without network access.

The package reaches for the network in two places: ``instructions.py`` calls ``spacy.cli.download('en_core_web_sm')``
at import (no verifier ever uses spaCy: the model is downloaded and never loaded), and several verifiers call
``nltk.download(...)`` when built or checked. Both calls are replaced, only while the package is imported or
run, by recorders that fetch nothing; spaCy need not be installed. NLTK data already on ``nltk.data.path`` (for
example under ``$NLTK_DATA``) is used as usual; a verifier whose data is missing raises LookupError, which
the scorer reports as unscored.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Imported in this order; ``evaluation_lib`` holds the package's own scoring functions.
VERIFIER_MODULES = (
    "ifbench.instructions_util",
    "ifbench.instructions",
    "ifbench.instructions_registry",
    "ifbench.evaluation_lib",
)
#: The NLTK resources the verifiers can touch: where ``nltk.data.find`` looks for each.
NLTK_RESOURCES = {
    "punkt_tab": "tokenizers/punkt_tab/english/",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
    "stopwords": "corpora/stopwords/english",
}


@dataclass
class InterceptedDownloads:
    """Downloads the package asked for and did not get, by library, in call order (repeats kept once)."""

    spacy: list[str] = field(default_factory=list)
    nltk: list[str] = field(default_factory=list)

    def recorder(self, library: str) -> Callable[..., bool]:
        names = self.spacy if library == "spacy" else self.nltk

        def download(info_or_id: Any = None, *args: Any, **kwargs: Any) -> bool:
            name = str(info_or_id)
            if name not in names:
                names.append(name)
            return False  # nothing was downloaded

        return download


@contextlib.contextmanager
def nltk_downloads_intercepted(record: InterceptedDownloads) -> Iterator[None]:
    """``nltk.download`` fetches nothing and records what was asked, until the block ends."""
    import nltk

    real = nltk.download
    nltk.download = record.recorder("nltk")
    try:
        yield
    finally:
        nltk.download = real


@contextlib.contextmanager
def spacy_download_intercepted(record: InterceptedDownloads) -> Iterator[None]:
    """``from spacy.cli import download`` finds a recorder that fetches nothing, until the block ends.

    Only ``spacy.cli`` is stood in for, and only during the import of the verifiers: the package imports that one
    name and calls it once, at import time. A real spaCy, installed or not, is left as it was.
    """
    stand_in = types.ModuleType("spacy.cli", "stand-in: IFBench's spaCy model download, skipped (no verifier uses it)")
    stand_in.download = record.recorder("spacy")  # type: ignore[attr-defined]
    missing = object()
    previous = sys.modules.get("spacy.cli", missing)
    sys.modules["spacy.cli"] = stand_in
    try:
        yield
    finally:
        if previous is missing:
            sys.modules.pop("spacy.cli", None)
        else:
            sys.modules["spacy.cli"] = previous  # type: ignore[assignment]


@dataclass(frozen=True)
class IFBenchVerifiers:
    """The imported package: its instruction registry and own evaluation module, and what its import asked for."""

    package_dir: Path
    registry: dict[str, Any]  # instruction id -> verifier class
    evaluation_lib: types.ModuleType
    import_downloads: InterceptedDownloads


class VerifierImportError(RuntimeError):
    """The verifier modules could not be imported from the cache entry."""


def _check_not_shadowed(package_dir: Path) -> None:
    existing = sys.modules.get("ifbench")
    if existing is None:
        return
    origin = Path(getattr(existing, "__file__", "") or "").resolve()
    expected = (package_dir / "ifbench" / "__init__.py").resolve()
    if origin != expected:
        raise VerifierImportError(
            f"a different 'ifbench' module is already imported (from {origin}); PrefFlow scores with the pinned "
            f"copy in {package_dir}. Fix: do not import another ifbench package in the same process."
        )


@functools.cache
def import_verifiers(package_dir: Path) -> IFBenchVerifiers:
    """Import the verifier modules from ``package_dir`` (an extracted cache entry) with both downloads intercepted.

    Once per process and directory: Python keeps the modules, so a second import would record nothing.
    """
    _check_not_shadowed(package_dir)
    record = InterceptedDownloads()
    path_entry = str(package_dir)
    sys.path.insert(0, path_entry)
    try:
        with spacy_download_intercepted(record), nltk_downloads_intercepted(record):
            modules = {name: importlib.import_module(name) for name in VERIFIER_MODULES}
    except ImportError as exc:
        raise VerifierImportError(
            f"importing IFBench's verifiers from {package_dir} failed: {exc}. Fix: install PrefFlow's dependencies "
            f"(`pip install -e .`: nltk, emoji, syllapy)."
        ) from exc
    finally:
        sys.path.remove(path_entry)
    return IFBenchVerifiers(
        package_dir=package_dir,
        registry=dict(modules["ifbench.instructions_registry"].INSTRUCTION_DICT),
        evaluation_lib=modules["ifbench.evaluation_lib"],
        import_downloads=record,
    )


def nltk_resource_locations() -> dict[str, str | None]:
    """Where each NLTK resource the verifiers can use was found, or None where it is missing (then unscored)."""
    import nltk

    found: dict[str, str | None] = {}
    for name, resource in NLTK_RESOURCES.items():
        try:
            found[name] = str(nltk.data.find(resource))
        except LookupError:
            found[name] = None
    return found
