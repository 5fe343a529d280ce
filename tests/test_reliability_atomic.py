"""Interrupted writes: every writer the pipeline uses is failed at each step of its commit protocol (patched os calls,
ENOSPC/EIO) and killed at random moments (SIGKILL of a child); the previous output stays whole, no half file is
visible under a final name, and the next write succeeds."""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from steps import io as sio

REPO = Path(__file__).resolve().parents[1]
#: os calls of the write protocols (data, fsync, modes, commit renames); the atomic swap is patched separately
OPS = ("write", "fsync", "chmod", "replace", "rename")
DOT_OUTPUTS = {".metadata"}  # torch.distributed.checkpoint's own index file: a real output, not a temp
MAX_POINTS = 40  # failure points per writer: every one up to this, else a seeded sample (first and last kept)
FILE_TEMP = re.compile(r"(.*/)?\.[^/]+\.[A-Za-z0-9_]+\.tmp")  # mkstemp's name for a file a SIGKILL left unrenamed
INTERRUPTED: dict[str, int] = {}  # writer -> interrupted writes checked (for the README figures)


class Injected(OSError):
    pass


class Faults:
    """Counts the protocol's os calls and raises at call number ``fail_at`` (None: count only)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None):
        self.fail_at, self.calls, self.committed = fail_at, 0, False
        for name in OPS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        monkeypatch.setattr(sio, "_exchange", self._wrap("exchange", sio._exchange))

    def _wrap(self, name: str, real: Callable) -> Callable:
        def call(*args, **kwargs):
            index = self.calls
            self.calls += 1
            if index == self.fail_at:
                raise Injected(errno.ENOSPC if name == "write" else errno.EIO, f"injected: {name} #{index}")
            result = real(*args, **kwargs)
            if name in ("replace", "rename", "exchange") and result is not False:
                self.committed = True
            return result

        return call


def _normalise(rel: str, data: bytes) -> bytes:
    """Timestamps aside (the COMPLETE marker, the cache manifest's creation time), versions are byte-identical."""
    if Path(rel).name == "COMPLETE":
        return b"<marker>"
    if Path(rel).name == ".metadata":  # DCP's index carries a random save id
        return re.sub(rb"save_id\x94\x8c\$[0-9a-f-]{36}", b"save_id<uuid>", data)
    if Path(rel).name == "prefflow_manifest.json":
        doc = json.loads(data)
        doc.pop("created_unix", None)
        return json.dumps(doc, sort_keys=True).encode()
    return data


def _hidden(part: str) -> bool:
    """Temp, build and discarded names start with a dot (what readers never open)."""
    return part.startswith(".") and part not in DOT_OUTPUTS


def visible(root: Path) -> dict[str, bytes]:
    """What a reader opening final names sees."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(_hidden(part) for part in rel.parts) and not p.name.endswith(".lock"):
            out[str(rel)] = _normalise(str(rel), p.read_bytes())
    return out


def leftovers(root: Path) -> list[str]:
    """Temp names left behind (outermost only); lock files (``.report.lock``, ``.<entry>.lock``) are meant to stay."""
    found = []
    for p in root.rglob(".*"):
        rel = p.relative_to(root)
        if _hidden(p.name) and not p.name.endswith(".lock") and not any(_hidden(q) for q in rel.parts[:-1]):
            found.append(str(rel))
    return sorted(found)


# ----------------------------------------------------------------------------- the writers


@dataclass
class Writer:
    """``write(root, version)`` writes version 1 or 2 of one pipeline output under ``root``; ``units(snapshot)``
    groups files that must change together (a model or checkpoint directory is one unit)."""

    name: str
    write: Callable[[Path, int], None]
    units: Callable[[dict[str, bytes]], dict[str, tuple]]
    leaks_temp_files: bool = False  # see test_data_prep_failure_leaves_no_temp_files


def _per_file(snapshot: dict[str, bytes]) -> dict[str, tuple]:
    return {rel: (data,) for rel, data in snapshot.items()}


def _by_top_dir(depth: int) -> Callable[[dict[str, bytes]], dict[str, tuple]]:
    def units(snapshot: dict[str, bytes]) -> dict[str, tuple]:
        out: dict[str, list] = {}
        for rel, data in snapshot.items():
            key = "/".join(Path(rel).parts[:depth])
            out.setdefault(key, []).append((rel, data))
        return {k: tuple(v) for k, v in out.items()}

    return units


def _json(root: Path, v: int) -> None:
    rows = [{"i": i, "text": "x" * 40} for i in range(2000 * v)]  # ~0.1-0.2 MB: a kill can land mid-write
    sio.write_json(root / "eval" / "dpo" / "metrics.json", {"version": v, "rows": rows})


def _jsonl(root: Path, v: int) -> None:
    sio.write_jsonl(root / "data" / "sft.train.jsonl", ({"v": v, "i": i, "text": "y" * 40} for i in range(2000 * v)))


def _data(root: Path, v: int) -> None:
    from steps.config import config_from_dict
    from steps.data import prepare_data

    prepare_data(config_from_dict({"data": {"input": "embedded", "max_trees": 4 + 2 * v}}).data, root / "data")


def _tiny(seed: int):
    from steps.models import load_model

    return load_model('tiny:{"vocab_size": 256, "hidden_size": 16}', seed=seed)


def _model_dir(root: Path, v: int) -> None:
    from steps.train.checkpoints import save_model_dir

    save_model_dir(_tiny(v), None, root / "sft" / "final")


def _checkpoint(root: Path, v: int) -> None:
    import numpy as np
    import torch

    from steps.train.checkpoints import save_checkpoint

    model = _tiny(v)
    random.seed(v)  # the checkpoint holds the RNG states: make them the version's too
    np.random.seed(v)
    torch.manual_seed(v)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(root / "checkpoints", v, model, optimizer, scheduler, {"step": v, "epoch": 0}, keep=1)


@functools.lru_cache(maxsize=2)
def _report_files(v: int) -> tuple[tuple[str, bytes], ...]:
    from steps.report import Selection
    from steps.report.generate import render_report
    from tests.test_report import make_record

    records = [make_record(lc=10.0 * v, wr=9.0 * v)] + ([make_record("1700000000000002", 4)] if v == 2 else [])
    return tuple(render_report(records, Selection())[0].items())


def _report(root: Path, v: int) -> None:
    """The report writer over files rendered once per version (rendering is not what is being interrupted)."""
    from steps.report.generate import _write_files

    _write_files(root / "reports", dict(_report_files(v)))


def _judge_cache(root: Path, v: int) -> None:
    from steps.evaluate.annotate import AnnotationCache

    cache = AnnotationCache(root / "judge_cache", "served:judge")
    for i in range(v):
        key = cache.key(f"q{i}", "ref", "out")
        if cache.get(key) is None:
            cache.put(key, {"preference": 1.0 + i / 2, "raw_completion": {"text": "m" * 200}})


def _model_cache(root: Path, v: int) -> None:
    from steps.models.cache import materialize_cached_dir

    if v == 2:  # version 1 is "no entry yet"; version 2 builds it
        materialize_cached_dir(root / "models" / "tiny", lambda d: _tiny(7).save_pretrained(d))


WRITERS = [
    Writer("json", _json, _per_file),
    Writer("jsonl", _jsonl, _per_file),
    Writer("data", _data, _per_file, leaks_temp_files=True),
    Writer("model_dir", _model_dir, _by_top_dir(2)),
    Writer("checkpoint", _checkpoint, _by_top_dir(2)),
    Writer("report", _report, _per_file),
    Writer("judge_cache", _judge_cache, _per_file),
    Writer("model_cache", _model_cache, _by_top_dir(2)),
]


def _failure_points(total: int, name: str) -> list[int]:
    if total <= MAX_POINTS:
        return list(range(total))
    rng = random.Random(f"prefflow-{name}")
    return sorted({0, total - 1, *rng.sample(range(total), MAX_POINTS - 2)})


def check_interrupted_writes(writer: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Fail ``writer``'s second version at each os call of its protocol in turn; returns the failures checked."""
    root = tmp_path / "out"
    writer.write(root, 1)
    before = visible(root)
    with monkeypatch.context() as m:
        counter = Faults(m)
        writer.write(root, 2)
    after, total = visible(root), counter.calls
    assert after != before and total > 0
    units_before, units_after = writer.units(before), writer.units(after)
    checked = 0
    for point in _failure_points(total, writer.name):
        shutil.rmtree(root)
        writer.write(root, 1)
        with monkeypatch.context() as m:
            faults = Faults(m, fail_at=point)
            with pytest.raises(BaseException) as err:  # DCP raises CheckpointException, a BaseException
                writer.write(root, 2)
            assert "injected" in str(err.value)
        seen = writer.units(visible(root))
        where = f"{writer.name}: failure at os call #{point} of {total}"
        if not faults.committed:
            assert seen == units_before, where  # nothing published yet: exactly the previous output
        for unit, content in seen.items():  # each file (or directory) is a whole old or a whole new version
            assert content in (units_before.get(unit), units_after.get(unit)), f"{where}: {unit} is torn"
        if writer.name == "checkpoint":
            assert set(seen) & {"checkpoints/step_0000001", "checkpoints/step_0000002"}, where  # one to resume
        writer.write(root, 2)  # the next attempt succeeds and cleans up after the failed one
        assert writer.units(visible(root)) == units_after, where
        left = leftovers(root)
        assert left == [] or (writer.leaks_temp_files and all(FILE_TEMP.fullmatch(p) for p in left)), where
        checked += 1
    return checked


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_a_write_failing_at_any_step_leaves_the_previous_output(writer, tmp_path, monkeypatch):
    INTERRUPTED[f"patched:{writer.name}"] = check_interrupted_writes(writer, tmp_path, monkeypatch)


def _naive(root: Path, v: int) -> None:
    """Writes straight to the final name in two chunks: what the harness must catch."""
    path = root / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"version": v, "pad": "z" * 100 * v}).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data[: len(data) // 2])
        os.write(fd, data[len(data) // 2 :])
    finally:
        os.close(fd)


def test_the_check_catches_a_writer_that_is_not_atomic(tmp_path, monkeypatch):
    with pytest.raises(AssertionError, match=r"naive: failure at os call #0 of 2"):
        check_interrupted_writes(Writer("naive", _naive, _per_file), tmp_path, monkeypatch)


# ----------------------------------------------------------------------------- killed writers

KILL_CHILD = r"""
import json, sys
from pathlib import Path
from tests import test_reliability_atomic as t

name, root = sys.argv[1], Path(sys.argv[2])
write = {w.name: w.write for w in t.WRITERS}[name]
write(root, 1)  # imports done, the output exists: kills from here on land among real writes
print("ready", flush=True)
v = 1
while True:
    write(root, 1 + v % 2)  # versions 1, 2, 1, 2, ... over the same outputs
    print(f"done {v}", flush=True)
    v += 1
"""
KILLS = {"json": 6, "jsonl": 6, "data": 4, "model_dir": 4, "checkpoint": 4, "report": 5}


def _killed_once(name: str, root: Path, delay: float) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, name, str(root)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    return len([line for line in out.splitlines() if line.startswith("done")])


def _assert_tables_find_their_files(seen: dict[str, bytes], versions: dict[int, dict], where: str) -> None:
    """A report killed part-way: the results table is one version and every file of that version is there; stale
    files of the other version may stay until the next write removes them (the tables never link to them)."""
    table = "reports/results.md"
    assert versions[1][table] != versions[2][table]
    shown = next((v for v in (1, 2) if seen.get(table) == versions[v][table]), None)
    assert shown is not None, f"{where}: {table} is missing or torn"
    other = versions[3 - shown]
    assert set(versions[shown]) <= set(seen), f"{where}: missing {sorted(set(versions[shown]) - set(seen))}"
    assert set(seen) - set(versions[shown]) <= set(other), f"{where}: {sorted(set(seen) - set(versions[shown]))}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KILLS))
def test_a_writer_killed_at_a_random_moment_leaves_whole_outputs(name, tmp_path):
    writer = next(w for w in WRITERS if w.name == name)
    root, versions = tmp_path / "out", {}
    write_s = 0.0
    for v in (1, 2):  # written where the kills happen: some files (DCP's index) record their own path
        shutil.rmtree(root, ignore_errors=True)
        writer.write(root, 1)
        if v == 2:
            started = time.perf_counter()
            writer.write(root, 2)
            write_s = time.perf_counter() - started
        versions[v] = writer.units(visible(root))
    # kill within a few writes' time: a loaded machine writes slower, and kills that all land before the child's
    # first write would check nothing (the report writer draws plots: over a second a write under load)
    window = max(1.5, 3 * write_s)
    rng = random.Random(f"kill-{name}")
    shutil.rmtree(root)
    writer.write(root, 1)
    completed = 0
    for trial in range(KILLS[name]):
        done = _killed_once(name, root, rng.uniform(0.0, window))
        completed += done
        seen = writer.units(visible(root))
        where = f"{name}: kill {trial} after {done} complete writes"
        if name == "report":
            _assert_tables_find_their_files(seen, versions, where)
        elif name != "checkpoint":
            assert set(seen) == set(versions[2]) or set(seen) == set(versions[1]), where
        for unit, content in seen.items():
            assert content in (versions[1].get(unit), versions[2].get(unit)), f"{where}: {unit} is torn"
    writer.write(root, 2)  # and the next run writes normally over what the kills left
    assert writer.units(visible(root)) == versions[2]
    # what may remain: dot-named temp files of killed file writes (never read); no directory leftovers
    assert all(FILE_TEMP.fullmatch(p) for p in leftovers(root)), leftovers(root)
    INTERRUPTED[f"killed:{name}"] = KILLS[name]
    assert completed > 0  # the kills did land among writes, not before the first


APPEND_CHILD = r"""
import sys
from pathlib import Path
from steps.evaluate.annotate import AnnotationCache

cache = AnnotationCache(Path(sys.argv[1]), "served:judge")
start = int(sys.argv[2])
print("ready", flush=True)
for i in range(start, start + 100000):
    cache.put(cache.key(f"q{i}", "reference", "output"), {"preference": 1.5, "raw_completion": {"text": "m" * 3000}})
    print(f"done {i}", flush=True)
"""


@pytest.mark.slow
def test_judge_cache_appends_killed_mid_line_lose_only_that_line(tmp_path):
    """Each judgement reported written survives; a torn last line is skipped and never swallows later lines."""
    from steps.evaluate.annotate import AnnotationCache

    rng, start, kills = random.Random("append-kill"), 0, 8
    for trial in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", APPEND_CHILD, str(tmp_path), str(start)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        done = [int(line.split()[1]) for line in out.splitlines() if line.startswith("done")]
        cache = AnnotationCache(tmp_path, "served:judge")
        have = {i for i in range(start + len(done) + 2) if cache.get(cache.key(f"q{i}", "reference", "output"))}
        last = done[-1] if done else start - 1
        tail = cache.path.read_bytes()[-400:]
        where = f"kill {trial}: started at {start}, {len(done)} reported, have {sorted(have)[-3:]}, tail {tail!r}"
        assert set(range(last + 1)) <= have <= set(range(last + 2)), where
        start = max(have) + 1 if have else 0
    assert len(AnnotationCache(tmp_path, "served:judge")) == start
    INTERRUPTED["killed:judge_cache"] = kills


def fail_fsync(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """The ``at``-th ``os.fsync`` from now raises ENOSPC (a disk that fills up mid-write); the others run."""
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_data_prep_failure_leaves_no_temp_files(tmp_path, monkeypatch):
    _data(tmp_path, 1)
    fail_fsync(monkeypatch, 1)
    with pytest.raises(OSError):
        _data(tmp_path, 2)
    assert leftovers(tmp_path) == []


def test_temp_files_of_killed_file_writes_stay_hidden_and_are_not_mistaken(tmp_path):
    """A SIGKILL between mkstemp and rename leaves ``.name.XXXX.tmp``: dot-named, never read as the output."""
    target = tmp_path / "metrics.json"
    sio.write_json(target, {"v": 1})
    (tmp_path / ".metrics.json.abc123.tmp").write_text('{"v": 2, "tru')  # what such a kill leaves behind
    assert sio.read_json(target) == {"v": 1} and visible(tmp_path) == {"metrics.json": target.read_bytes()}
    assert json.loads(target.read_text()) == {"v": 1}
