"""Atomic outputs: files go through a temp name in the same directory, fsync and a rename; directories are published
by one atomic swap; append-only logs survive a line torn by a kill; output locations are checked before work starts.
A crash, a full disk or a concurrent reader never sees half a file under its final name."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from steps.locks import file_lock

logger = logging.getLogger(__name__)

#: Free space an output location needs before a run starts (MiB); ``PREFFLOW_MIN_FREE_MB`` overrides it.
MIN_FREE_ENV = "PREFFLOW_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 1024


class JsonlError(ValueError):
    """A JSONL file has a line that is not a JSON object."""


class OutputLocationError(OSError):
    """An output location that cannot take the run's files (not writable, not a directory, too little space)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it process-wide)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What ``open()`` would give a new file: 0666 less the umask (``mkstemp`` gives 0600)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """What ``mkdir`` would give a new directory: 0777 less the umask (``mkdtemp`` gives 0700)."""
    return 0o777 & ~_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or an unlink in ``path`` durable (no-op where the filesystem cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """``with atomic_writer(p) as fh: fh.write(...)``: ``p`` appears complete when the block ends, or not at all
    (an exception, ENOSPC included, removes the temp file and leaves any previous ``p`` untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_writer(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_files(files: Mapping[str | os.PathLike, bytes]) -> list[Path]:
    """Write several files so that a failure while writing (a full disk) replaces none of them: every file is
    staged and fsynced first, then each is renamed into place."""
    staged: list[tuple[str, Path]] = []
    try:
        for target, data in files.items():
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, file_mode())
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    done = 0
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
            done += 1
    except BaseException:
        for tmp, _ in staged[done:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for parent in sorted({path.parent for _, path in staged}):
        fsync_dir(parent)
    return [path for _, path in staged]


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def jsonl_line(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    with atomic_writer(path) as fh:
        for row in rows:
            fh.write(jsonl_line(row))
    return Path(path)


def iter_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False) -> Iterator[dict]:
    """Rows of a JSONL file. ``skip_bad_lines`` (append-only logs): a line that is not a JSON object, such as one
    torn by a killed writer, is logged and skipped instead of raising :class:`JsonlError`."""
    skipped = 0
    with open(path, encoding="utf-8", errors="replace" if skip_bad_lines else "strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
            except json.JSONDecodeError as exc:
                row, problem = None, f"not valid JSON ({exc.msg}); fix or remove the line"
            if problem is None:
                yield row
            elif skip_bad_lines:
                skipped += 1
            else:
                raise JsonlError(f"{path}:{lineno}: {problem}")
    if skipped:
        logger.warning("%s: %d unreadable line(s) skipped (torn by an interrupted write?)", path, skipped)


def read_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False) -> list[dict]:
    return list(iter_jsonl(path, skip_bad_lines))


def append_jsonl(path: str | os.PathLike, row: dict, *, lock: bool = False, fsync: bool = True) -> None:
    """Append one line to an append-only log in a single ``write``. A previous line torn by a kill (no final
    newline) is closed first so it cannot swallow this one; a failed write (ENOSPC) is cut back off, leaving the
    file as it was. ``lock``: hold ``<path>.lock`` (several processes appending to one file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    guard = file_lock(path.with_name(path.name + ".lock"), f"append to {path.name}") if lock else None
    with guard or contextlib.nullcontext():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode())
        try:
            size = os.fstat(fd).st_size
            data = jsonl_line(row)
            if size and _last_byte(path) != b"\n":
                data = b"\n" + data
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if fsync:
                    os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


# ----------------------------------------------------------------------------- directories


def normalize_modes(root: str | os.PathLike) -> None:
    """Give every file and directory under ``root`` (itself included) the umask's modes, as plain ``open`` and
    ``mkdir`` would (temp-file helpers and some writers, safetensors among them, create owner-only files)."""
    root = Path(root)
    fmode, dmode = file_mode(), dir_mode()
    for here, _, files in os.walk(root):
        os.chmod(here, dmode)
        for name in files:
            target = os.path.join(here, name)
            if not os.path.islink(target):
                os.chmod(target, fmode)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file, then every directory (deepest first), under ``root``: what a rename publishes is on disk."""
    walked = list(os.walk(os.fspath(root)))
    for here, _, files in walked:
        for name in files:
            target = os.path.join(here, name)
            if os.path.islink(target):
                continue
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for here, _, _ in reversed(walked):
        fsync_dir(here)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _trash_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.discard-{os.getpid()}-{time.time_ns()}")


def discard_dir(path: str | os.PathLike, named_after: str | os.PathLike | None = None) -> None:
    """Rename ``path`` out of the way (one step: nothing half-deleted keeps its name), then delete it. The trash
    is ``.<name>.discard-*`` of ``named_after`` (default ``path``), which :func:`remove_leftovers` finds."""
    path = Path(path)
    trash = _trash_name(Path(named_after) if named_after is not None else path)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(target: str | os.PathLike) -> None:
    """Delete ``.<name>.*`` temp and discard directories next to ``target`` left by killed writers. Call only as
    the one writer of ``target``."""
    target = Path(target)
    for leftover in target.parent.glob(f".{target.name}.*"):
        if leftover.is_dir() and not leftover.is_symlink():
            logger.warning("removing %s, left by an interrupted write", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Publish the fully written directory ``tmp`` (same filesystem) as ``final``: modes follow the umask, every
    file is fsynced, then one rename, or one atomic swap when ``final`` exists (the previous version stays whole
    until the new one is in place; it is deleted afterwards). Without ``renameat2`` (not Linux, or a filesystem
    without it) the old directory is renamed aside first, so ``final`` is missing, never partial, for an instant."""
    tmp, final = Path(tmp), Path(final)
    normalize_modes(tmp)
    fsync_tree(tmp)
    try:
        os.rename(tmp, final)  # final absent (or an empty directory)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _exchange(tmp, final):
            discard_dir(tmp, named_after=final)  # tmp now holds the previous version
        else:
            aside = _trash_name(final)
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(final.parent)
    return final


# ----------------------------------------------------------------------------- output locations


def min_free_bytes() -> int:
    """The free space every output location needs before a run starts: ``$PREFFLOW_MIN_FREE_MB`` MiB, default 1024."""
    raw = os.environ.get(MIN_FREE_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_FREE_MB << 20
    try:
        value = float(raw)
    except ValueError:
        raise OutputLocationError(f"${MIN_FREE_ENV}: got {raw!r}; give a number of MiB, e.g. 1024") from None
    if value < 0:
        raise OutputLocationError(f"${MIN_FREE_ENV}: got {raw!r}; give a number of MiB >= 0")
    return int(value * 2**20)


def check_output_location(path: str | os.PathLike, what: str, min_free: int | None = None) -> Path:
    """Create ``path`` if needed and prove a file can be written, fsynced and removed there, and that at least
    ``min_free`` bytes (default :func:`min_free_bytes`) are free; else raise :class:`OutputLocationError` naming
    ``what`` (the setting) and the fix. Writes nothing that stays."""
    path = Path(path).expanduser().absolute()
    need = min_free_bytes() if min_free is None else min_free
    fix = f"point {what} at a writable directory with at least {need / 2**20:.0f} MiB free"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".prefflow-write-check-")
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputLocationError(
            exc.errno, f"{what} {path}: cannot write there ({reason}); {fix} (earlier outputs are untouched)"
        ) from None
    free = shutil.disk_usage(path).free
    if free < need:
        raise OutputLocationError(
            errno.ENOSPC,
            f"{what} {path}: only {free / 2**20:.0f} MiB free, a run needs at least {need / 2**20:.0f} MiB "
            f"(${MIN_FREE_ENV}); free some space or {fix}",
        )
    return path
