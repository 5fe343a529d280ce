"""Manifested cache entries: directories whose every file is listed with size and sha256, built at most once.

A directory without a complete, matching manifest is never used: it is discarded and rebuilt under a file lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steps.io import publish_dir, read_json, write_json
from steps.locks import file_lock

logger = logging.getLogger(__name__)

MANIFEST_NAME = "prefflow_manifest.json"
MANIFEST_FORMAT = 1
CACHE_ENV_VAR = "PREFFLOW_CACHE"

#: Files already hashed in this process: (path, inode, size, mtime_ns, expected sha256).
_VERIFIED_FILES: set[tuple[str, int, int, int, str]] = set()


def cache_dir() -> Path:
    """``$PREFFLOW_CACHE`` or ``~/.cache/prefflow``: where converted models and downloaded wheels live."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "prefflow"


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (the 517 MiB checkpoint never sits in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Record name, size and sha256 of every file in ``directory`` (recursively) in ``prefflow_manifest.json``.

    Written last, so a directory with a manifest is a directory whose files were all completely written.
    """
    directory = Path(directory)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if not files:
        raise ValueError(f"{directory}: nothing to put in a manifest (the directory has no files)")
    manifest = {"format": MANIFEST_FORMAT, "files": files, **(extra or {})}
    out = write_json(directory / MANIFEST_NAME, manifest)
    logger.info(
        "wrote %s (%d files, %.1f MiB)",
        out,
        len(files),
        sum(f["size"] for f in files.values()) / 2**20,
    )
    return out


def _manifest_files(manifest_path: Path) -> dict[str, dict[str, Any]] | str:
    """The manifest's file table, or why it cannot be used."""
    try:
        manifest = read_json(manifest_path)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            return f"{manifest_path}: unknown format or empty file list"
        if not all(
            isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
            for f in files.values()
        ):
            return f"{manifest_path}: a file entry lacks its size or sha256"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    return files


def cache_problem(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` is not a complete, intact manifested cache entry, or None when it is.

    Checks every file the manifest lists: present, same size, same sha256. Hashing is done on every check
    because it is cheap next to loading: sha256 of the 517 MiB SmolLM2 checkpoint takes ~0.5 s here
    (SHA extensions) against ~2 s for ``from_pretrained``, and the file is then read from the page cache.
    A result is remembered per process for unchanged files (same inode, size, mtime), so loading the policy
    and the reference from one cache entry hashes it once.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        return f"{directory} does not exist"
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the build did not finish)"
    files = _manifest_files(manifest_path)
    if isinstance(files, str):
        return files
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{path} is missing"
        stat = path.stat()
        if stat.st_size != expected["size"]:
            return f"{path} has {stat.st_size} bytes, the manifest says {expected['size']}"
        key = (
            str(path.resolve()),
            stat.st_ino,
            stat.st_size,
            stat.st_mtime_ns,
            expected["sha256"],
        )
        if key in _VERIFIED_FILES:
            continue
        actual = sha256_file(path)
        if actual != expected["sha256"]:
            return f"{path} has sha256 {actual[:12]}..., the manifest says {expected['sha256'][:12]}..."
        _VERIFIED_FILES.add(key)
    return None


def verify_cache(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds every file its manifest lists, intact. Logs the reason when not."""
    problem = cache_problem(directory)
    if problem is not None:
        logger.info("cache check failed: %s", problem)
    return problem is None


def _discard(directory: Path) -> None:
    """Move a bad entry out of the way first (one rename), then delete it."""
    trash = directory.with_name(f".{directory.name}.discard-{os.getpid()}-{time.time_ns()}")
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Delete temp/discard directories of builds that were killed (only a lock holder creates them)."""
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.is_dir():
            logger.warning("removing leftover %s from an interrupted build", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def materialize_cached_dir(
    target: str | os.PathLike,
    build: Callable[[Path], None],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Return ``target`` once it is a verified cache entry, calling ``build(tmp_dir)`` to create it if needed.

    ``build`` fills an empty temporary directory next to ``target``; a manifest is then written last, the
    result verified, and the directory renamed into place in one step, so readers never see a partial entry.
    A missing, partial or corrupt entry is logged, discarded and rebuilt, never used. A file lock makes
    concurrent callers wait for one build instead of each doing it. ``metadata`` goes into the manifest.
    """
    target = Path(target)
    if verify_cache(target):
        return target
    with file_lock(target.with_name(f".{target.name}.lock"), f"cache entry {target.name}"):
        problem = cache_problem(target)
        if problem is None:  # built by another process while we waited
            return target
        if target.exists():
            logger.warning("discarding unusable cache entry %s: %s", target, problem)
            _discard(target)
        _remove_leftovers(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build-"))
        try:
            started = time.monotonic()
            build(tmp)
            write_manifest(tmp, extra={**(metadata or {}), "created_unix": time.time()})
            problem = cache_problem(tmp)
            if problem is not None:
                raise RuntimeError(f"freshly built cache entry failed verification: {problem}")
            # mkdtemp makes the directory owner-only and some writers (safetensors) make 0600 files: the entry
            # follows the umask like any directory the user creates; fsynced, then renamed into place
            publish_dir(tmp, target)
            logger.info("built %s in %.1f s", target, time.monotonic() - started)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
