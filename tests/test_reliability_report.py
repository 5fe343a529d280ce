"""Report writes under concurrency and failure: writers in separate processes race on one report directory while a
reader checks every read of results.{md,csv,json} is one whole version; a failed regeneration (full disk) leaves
every earlier row in place."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steps.report import Selection, render_report, write_report
from tests.test_reliability_atomic import fail_fsync
from tests.test_report import make_record, table_cells

REPO = Path(__file__).resolve().parents[1]
TABLES = ("results.md", "results.csv", "results.json")

WRITER = r"""
import sys
from pathlib import Path
from steps.report import Selection, write_report
from tests.test_report import make_record
from tests.test_reliability_report import versions

out, which, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
records = versions()[which]
print("ready", flush=True)
for _ in range(rounds):
    write_report(records, Selection(), out)
"""


def versions() -> dict[str, list]:
    """Two report contents that differ in every table: one run, or the same run plus a second one."""
    first = make_record(lc=41.0, wr=39.5)
    return {"one": [first], "two": [first, make_record("1700000000000002", day=4, lc=55.5, wr=50.25)]}


def _check_whole(name: str, data: bytes, n_rows: int) -> None:
    """A table read from disk parses completely and has the rows of the version it claims to be."""
    text = data.decode("utf-8")
    if name == "results.json":
        assert len(json.loads(text)["rows"]) == n_rows
    elif name == "results.csv":
        assert len(list(csv.DictReader(io.StringIO(text)))) == n_rows
    else:
        assert len(table_cells(text.split("\n## ")[0])) == 2 + n_rows and text.endswith("\n")


@pytest.mark.slow
def test_concurrent_report_writers_never_tear_the_tables(tmp_path):
    expected = {}
    for which, records in versions().items():
        files, _ = render_report(records, Selection())
        expected[which] = {name: files[name] for name in TABLES}
    n_rows = {"one": 2, "two": 4}
    out = tmp_path / "reports"
    write_report(versions()["one"], Selection(), out)
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out), which, "12"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for which in ("one", "two", "two")
    ]
    for w in writers:
        assert w.stdout.readline().strip() == "ready", w.stderr.read()[-2000:]
    reads, seen = 0, {name: set() for name in TABLES}
    while any(w.poll() is None for w in writers):
        for name in TABLES:
            data = (out / name).read_bytes()  # a reader takes no lock: only atomic replacement protects it
            match = [which for which in expected if expected[which][name] == data]
            assert match, f"{name}: a read matched no whole version ({len(data)} bytes)"
            _check_whole(name, data, n_rows[match[0]])
            seen[name].add(match[0])
            reads += 1
        time.sleep(0.002)
    for w in writers:
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err[-2000:]
    assert reads > 30 and all(seen[name] == {"one", "two"} for name in TABLES), (reads, seen)
    assert not list(out.rglob(".*.tmp"))  # no temp file outlives its writer


def test_a_failed_regeneration_removes_no_earlier_row(tmp_path, monkeypatch):
    """A rerun whose report write hits a full disk (here: the fsync of the 5th staged file) replaces nothing and
    deletes no snapshot: the earlier successful runs' rows, configs and plots are all still there."""
    out = tmp_path / "reports"
    earlier = versions()["two"]
    write_report(earlier, Selection(), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fail_fsync(monkeypatch, 5)
    rerun = [make_record("1700000000000003", day=5, lc=None, wr=None)]  # e.g. a latest-1 report of a new run
    with pytest.raises(OSError, match="No space left"):
        write_report(rerun, Selection(latest=1), out)
    monkeypatch.undo()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["run_id"] for r in rows] == ["1700000000000001"] * 2 + ["1700000000000002"] * 2
