"""steps.models.cache: manifests, verification of damaged entries, building an entry once (also across processes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steps.models import (
    MANIFEST_NAME,
    cache_problem,
    load_model,
    materialize_cached_dir,
    verify_cache,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_cache_entry(tmp_path_factory) -> Path:
    """A manifested save_pretrained directory of a very small model (the real big cache stays untouched)."""
    directory = tmp_path_factory.mktemp("entry") / "model"
    load_model('tiny:{"vocab_size": 512, "hidden_size": 32}').save_pretrained(directory)
    write_manifest(directory)
    return directory


def _copy(entry: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(entry, copy)
    return copy


def test_manifest_lists_every_file_with_size_and_sha256(small_cache_entry):
    manifest = json.loads((small_cache_entry / MANIFEST_NAME).read_text())
    on_disk = sorted(p.name for p in small_cache_entry.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(manifest["files"]) == on_disk and "model.safetensors" in on_disk
    for name, facts in manifest["files"].items():
        data = (small_cache_entry / name).read_bytes()
        assert facts == {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }, name
    assert verify_cache(small_cache_entry)
    assert cache_problem(small_cache_entry) is None


def test_manifest_of_an_empty_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no files"):
        write_manifest(tmp_path)


def test_truncated_safetensors_is_detected(small_cache_entry, tmp_path):
    copy = _copy(small_cache_entry, tmp_path)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    assert not verify_cache(copy)
    assert "bytes" in cache_problem(copy)


def test_same_size_corruption_is_detected(small_cache_entry, tmp_path):
    copy = _copy(small_cache_entry, tmp_path)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not verify_cache(copy)
    assert "sha256" in cache_problem(copy)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("no_manifest", "missing (the build did not finish)"),
        ("missing_file", "config.json is missing"),
        ("bad_manifest_json", "unreadable"),
        ("manifest_without_hash", "lacks its size or sha256"),
        ("unknown_format", "unknown format"),
        ("appended_bytes", "the manifest says"),
    ],
)
def test_partial_or_damaged_entries_are_detected(small_cache_entry, tmp_path, damage, fragment):
    copy = _copy(small_cache_entry, tmp_path)
    if damage == "no_manifest":
        (copy / MANIFEST_NAME).unlink()
    elif damage == "missing_file":
        (copy / "config.json").unlink()
    elif damage == "bad_manifest_json":
        (copy / MANIFEST_NAME).write_text('{"format": 1, "files": {')
    elif damage == "manifest_without_hash":
        (copy / MANIFEST_NAME).write_text('{"format": 1, "files": {"config.json": {"size": 1}}}')
    elif damage == "unknown_format":
        manifest = json.loads((copy / MANIFEST_NAME).read_text())
        (copy / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": 99}))
    else:
        with open(copy / "model.safetensors", "ab") as fh:
            fh.write(b"\0" * 8)
    assert not verify_cache(copy)
    assert fragment in cache_problem(copy)


def test_an_entry_that_was_never_built_is_not_valid(tmp_path):
    assert not verify_cache(tmp_path / "never-built")
    assert "does not exist" in cache_problem(tmp_path / "never-built")


def _write_tiny_entry(directory: Path) -> None:
    (directory / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (directory / "config.json").write_text('{"kind": "test"}')


def test_materialize_builds_once_and_rebuilds_a_corrupt_entry(tmp_path, caplog):
    calls = []

    def build(directory: Path) -> None:
        calls.append(directory)
        _write_tiny_entry(directory)

    target = tmp_path / "models" / "entry"
    assert materialize_cached_dir(target, build, {"source": "test"}) == target
    assert materialize_cached_dir(target, build) == target
    assert len(calls) == 1 and verify_cache(target)
    assert json.loads((target / MANIFEST_NAME).read_text())["source"] == "test"

    with open(target / "weights.bin", "r+b") as fh:
        fh.truncate(100)
    stale = target.parent / ".entry.build-killed"  # what a SIGKILLed build leaves behind
    stale.mkdir()
    (stale / "weights.bin").write_bytes(b"partial")
    with caplog.at_level("WARNING", logger="steps.models"):
        materialize_cached_dir(target, build)
    assert len(calls) == 2 and verify_cache(target)
    assert any("discarding unusable cache entry" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in target.parent.iterdir()) == [
        ".entry.lock",
        "entry",
    ]  # no temp dirs left


def test_failed_build_leaves_nothing_behind(tmp_path):
    def build(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"partial")
        raise RuntimeError("interrupted")

    target = tmp_path / "models" / "entry"
    with pytest.raises(RuntimeError, match="interrupted"):
        materialize_cached_dir(target, build)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".entry.lock"]


def test_concurrent_processes_build_once(tmp_path):
    """Two processes ask for the same entry at once: the lock makes one build and the other reuse it."""
    target = tmp_path / "models" / "entry"
    log = tmp_path / "builds.log"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from steps.models import materialize_cached_dir, verify_cache

        def build(directory):
            with open({str(log)!r}, "a") as fh:
                fh.write("build\\n")
            time.sleep(1.0)
            (directory / "weights.bin").write_bytes(b"w" * 4096)

        out = materialize_cached_dir(Path({str(target)!r}), build)
        assert verify_cache(out)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert log.read_text().splitlines() == ["build"]
    assert verify_cache(target)
