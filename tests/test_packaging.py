"""The library ships whole: in a wheel (setuptools' package finder) and in Metaflow's code package."""

from pathlib import Path

from setuptools import find_packages

from steps.packaging import library_files

REPO = Path(__file__).resolve().parents[1]


def _python_dirs() -> set[str]:
    return {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "steps").rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_every_python_directory_is_a_package_a_wheel_would_include():
    assert _python_dirs() <= set(find_packages(str(REPO), include=["steps*"]))


def test_code_package_lists_every_library_file_under_steps():
    listed = {arc: path for path, arc in library_files()}
    on_disk = {
        str(p.relative_to(REPO))
        for p in (REPO / "steps").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert set(listed) == on_disk
    assert "steps/train/loop.py" in listed and "steps/data/embedded/oasst2_sample.trees.jsonl" in listed
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in listed.values())
