"""steps.io: atomic files and directories, append-only logs with torn lines, output-location checks, file modes;
a full disk simulated by a patched writer (ENOSPC) and for real by a file-size limit (RLIMIT_FSIZE) in a child."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from steps import io as sio

REPO = Path(__file__).resolve().parents[1]


def _visible(root: Path) -> dict[str, bytes]:
    """Every file a reader would open by name (temp files start with a dot)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_atomic_write_replaces_whole_and_follows_the_umask(tmp_path, umask_027):
    target = tmp_path / "out" / "a.json"
    sio.write_json(target, {"v": 1})
    assert json.loads(target.read_text()) == {"v": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # 0666 & ~027, not mkstemp's 0600
    sio.write_jsonl(tmp_path / "rows.jsonl", ({"i": i} for i in range(3)))
    assert (tmp_path / "rows.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    assert _all_files(tmp_path) == ["out", "out/a.json", "rows.jsonl"]


@pytest.mark.parametrize("where", ["body", "fsync", "replace"])
def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch, where):
    target = tmp_path / "metrics.json"
    sio.write_json(target, {"v": "old"})
    before = target.read_bytes()
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    if where == "replace":
        monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(OSError) as err, sio.atomic_writer(target) as fh:
        fh.write(b'{"v": "half')
        if where == "body":
            _enospc()
        fh.write(b' new"}\n')
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == before
    assert _all_files(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_several_files_are_replaced_only_when_all_were_written(tmp_path, monkeypatch, fail_at):
    """The report's set (results.md/.csv/.json): a full disk while staging the third file replaces none of them."""
    names = ["results.md", "results.csv", "results.json"]
    sio.atomic_write_files({tmp_path / n: f"old {n}\n".encode() for n in names})
    before = _visible(tmp_path)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == fail_at:
            _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        sio.atomic_write_files({tmp_path / n: f"new {n}\n".encode() for n in names})
    monkeypatch.undo()
    assert _visible(tmp_path) == before and _all_files(tmp_path) == sorted(names)
    sio.atomic_write_files({tmp_path / n: f"new {n}\n".encode() for n in names})
    assert _visible(tmp_path) == {n: f"new {n}\n".encode() for n in names}


def test_jsonl_torn_last_line_is_an_error_for_data_and_skipped_for_logs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.raises(sio.JsonlError, match=r"metrics\.jsonl:3: not valid JSON"):
        sio.read_jsonl(path)
    assert sio.read_jsonl(path, skip_bad_lines=True) == [{"step": 1}, {"step": 2}]
    path.write_bytes(b'{"step": 1}\n[1, 2]\n\xff\xfe{"x"\n')
    assert sio.read_jsonl(path, skip_bad_lines=True) == [{"step": 1}]


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    sio.append_jsonl(path, {"i": 0})
    with open(path, "ab") as fh:  # what a writer killed mid-line leaves
        fh.write(b'{"i": 1, "resu')
    sio.append_jsonl(path, {"i": 2}, lock=True)
    sio.append_jsonl(path, {"i": 3})
    assert path.read_bytes() == b'{"i": 0}\n{"i": 1, "resu\n{"i": 2}\n{"i": 3}\n'
    assert sio.read_jsonl(path, skip_bad_lines=True) == [{"i": 0}, {"i": 2}, {"i": 3}]


def test_append_on_a_full_disk_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    for i in range(3):
        sio.append_jsonl(path, {"i": i})
    before = path.read_bytes()
    real_write = os.write

    def partial_then_full(fd, data):  # the disk fills after 5 bytes of the line
        real_write(fd, bytes(data[:5]))
        _enospc()

    monkeypatch.setattr(os, "write", partial_then_full)
    with pytest.raises(OSError):
        sio.append_jsonl(path, {"i": 3, "text": "x" * 100})
    monkeypatch.undo()
    assert path.read_bytes() == before
    sio.append_jsonl(path, {"i": 3})
    assert [r["i"] for r in sio.read_jsonl(path)] == [0, 1, 2, 3]


@pytest.mark.parametrize("swap", ["renameat2", "rename_aside"])
def test_publish_dir_swaps_whole_directories(tmp_path, monkeypatch, umask_027, swap):
    if swap == "rename_aside":
        monkeypatch.setattr(sio, "_exchange", lambda a, b: False)
    final = tmp_path / "final"
    for version in ("v1", "v2"):
        tmp = tmp_path / f".final.tmp-{version}"
        (tmp / "sub").mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(version.encode())
        (tmp / "model.safetensors").chmod(0o600)  # as safetensors writes it
        (tmp / "sub" / "x.json").write_text(version)
        sio.publish_dir(tmp, final)
        assert (final / "model.safetensors").read_bytes() == version.encode()
        assert (final / "sub" / "x.json").read_text() == version
        assert _all_files(tmp_path) == ["final", "final/model.safetensors", "final/sub", "final/sub/x.json"]
    assert stat.S_IMODE((final / "model.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE(final.stat().st_mode) == stat.S_IMODE((final / "sub").stat().st_mode) == 0o750


def test_publish_dir_failing_before_the_rename_keeps_the_previous_version(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "w.bin").write_bytes(b"old")
    tmp = tmp_path / ".final.tmp-1"
    tmp.mkdir()
    (tmp / "w.bin").write_bytes(b"new")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError):
        sio.publish_dir(tmp, final)
    monkeypatch.undo()
    assert (final / "w.bin").read_bytes() == b"old"
    sio.remove_leftovers(final)  # what the next writer does first
    assert _all_files(tmp_path) == ["final", "final/w.bin"]


def test_discard_dir_renames_before_deleting(tmp_path, monkeypatch):
    """A kill mid-delete (here: rmtree dies at once) never leaves a half-deleted directory under its name."""
    victim = tmp_path / "step_0000002"
    (victim / "state").mkdir(parents=True)
    (victim / "COMPLETE").write_text("{}")
    monkeypatch.setattr(sio.shutil, "rmtree", lambda *a, **k: None)
    sio.discard_dir(victim)
    (left,) = tmp_path.iterdir()
    assert not victim.exists() and left.name.startswith(".step_0000002.discard-")


# ----------------------------------------------------------------------------- output locations


def test_output_location_ok_creates_it_and_leaves_nothing(tmp_path):
    where = sio.check_output_location(tmp_path / "a" / "runs", "resources.output_dir", min_free=1)
    assert where == tmp_path / "a" / "runs" and where.is_dir() and list(where.iterdir()) == []


def _check_as_nobody(path: Path) -> str:
    """check_output_location in a forked child that dropped root (root writes anywhere); returns the error."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec (the interpreter may not be readable by nobody)
        message = ""
        try:
            os.setgid(65534)
            os.setuid(65534)
            sio.check_output_location(path, "resources.output_dir", min_free=1)
        except sio.OutputLocationError as exc:
            message = str(exc)
        except BaseException as exc:
            message = f"unexpected {type(exc).__name__}: {exc}"
        finally:
            os.write(write_fd, message.encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        message = fh.read().decode()
    os.waitpid(pid, 0)
    return message


def test_read_only_output_location_fails_clearly_and_keeps_outputs(tmp_path):
    locked = tmp_path / "runs"
    locked.mkdir()
    (locked / "earlier.json").write_text('{"kept": true}')
    locked.chmod(0o555)
    try:
        if os.geteuid() == 0:
            tmp_path.chmod(0o755)
            message = _check_as_nobody(locked)
        else:
            with pytest.raises(sio.OutputLocationError) as err:
                sio.check_output_location(locked, "resources.output_dir", min_free=1)
            message = str(err.value)
    finally:
        locked.chmod(0o755)
    assert message.startswith(f"resources.output_dir {locked}: cannot write there (Permission denied); point ")
    assert "earlier outputs are untouched" in message and "\n" not in message
    assert _all_files(locked) == ["earlier.json"] and (locked / "earlier.json").read_text() == '{"kept": true}'


def test_output_location_under_a_file_fails_clearly(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(sio.OutputLocationError, match=r"cannot write there \(Not a directory\)"):
        sio.check_output_location(tmp_path / "a_file" / "runs", "resources.output_dir", min_free=1)


def test_too_little_free_space_fails_with_the_numbers(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sio.shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (300 << 20), 300 << 20))
    monkeypatch.setenv(sio.MIN_FREE_ENV, "512")
    with pytest.raises(sio.OutputLocationError) as err:
        sio.check_output_location(tmp_path, "resources.output_dir")
    assert str(err.value).startswith(
        f"resources.output_dir {tmp_path}: only 300 MiB free, a run needs at least 512 MiB"
    )
    assert err.value.errno == errno.ENOSPC
    monkeypatch.setenv(sio.MIN_FREE_ENV, "256")
    assert sio.check_output_location(tmp_path, "resources.output_dir") == tmp_path
    monkeypatch.delenv(sio.MIN_FREE_ENV)
    assert sio.min_free_bytes() == 1024 << 20
    monkeypatch.setenv(sio.MIN_FREE_ENV, "lots")
    with pytest.raises(sio.OutputLocationError, match=r"\$PREFFLOW_MIN_FREE_MB: got 'lots'"):
        sio.min_free_bytes()


# ----------------------------------------------------------------------------- a real full disk: RLIMIT_FSIZE

FULL_DISK_CHILD = r"""
import json, os, resource, signal, sys
from pathlib import Path
from steps import io as sio

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
root = Path(sys.argv[1])
errors = {}
for name, write in [
    ("json", lambda: sio.write_json(root / "data.json", {"rows": ["x" * 100] * 100})),
    ("files", lambda: sio.atomic_write_files({root / "results.md": b"md" * 10, root / "results.csv": b"c" * 9000})),
    ("append", lambda: sio.append_jsonl(root / "log.jsonl", {"text": "y" * 5000})),
]:
    try:
        write()
        errors[name] = None
    except OSError as exc:
        errors[name] = exc.errno
print(json.dumps(errors))
"""


def test_a_real_full_disk_leaves_every_previous_file(tmp_path):
    sio.write_json(tmp_path / "data.json", {"rows": ["old"]})
    sio.atomic_write_files({tmp_path / "results.md": b"old md\n", tmp_path / "results.csv": b"old csv\n"})
    sio.append_jsonl(tmp_path / "log.jsonl", {"i": 0})
    before = _visible(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"json": errno.EFBIG, "files": errno.EFBIG, "append": errno.EFBIG}
    assert _visible(tmp_path) == before
    assert _all_files(tmp_path) == ["data.json", "log.jsonl", "results.csv", "results.md"]  # no temp left either
