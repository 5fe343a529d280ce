"""Shared fixtures: real data from ../shared, the real SmolLM2 tokenizer, tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Import torch before anything pulls in metaflow.runner: metaflow's vendored typing_extensions, once
# loaded by the Runner API, breaks a later first `import torch` in the same process (TypeError in
# torch._higher_order_ops). Flow steps are separate processes and are not affected.
import torch  # isort: skip
import torch._dynamo  # isort: skip  (the modules that break, imported while they still can be)
import torch.distributed.tensor  # noqa: F401  isort: skip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("USERNAME", "prefflow")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only real data beside the checkout (``../shared``). CI sets PREFFLOW_REQUIRE_SHARED=1, so a
    missing copy fails there instead of silently skipping every check against real files."""
    path = Path(os.environ.get("PREFFLOW_SHARED", REPO_ROOT.parent / "shared"))
    if not (path / "README.md").exists():
        reason = (
            f"needs ../shared (real OpenAssistant, AlpacaEval, fairseq2 files): none at {path}; set PREFFLOW_SHARED"
        )
        if os.environ.get("PREFFLOW_REQUIRE_SHARED"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from steps.models import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture()
def tiny_model_factory():
    from steps.models import load_model

    def make(seed: int = 0):
        return load_model("tiny", seed=seed)

    return make


@pytest.fixture(autouse=True)
def no_handed_plan(monkeypatch):
    """A passing preflight of ``run`` hands its plan to start through the environment (steps.config.checked_plan):
    each test starts without one and leaves none behind for later tests or the flows they start."""
    monkeypatch.setenv("PREFFLOW_CHECKED_PLAN", "")
    monkeypatch.delenv("PREFFLOW_CHECKED_PLAN")
