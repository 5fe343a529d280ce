"""Saved model directories for tests that need a model on disk (vLLM's job, the generation subprocess)."""

from __future__ import annotations

from pathlib import Path


def saved_tiny(path: Path, spec: str, tokenizer, seed: int = 0) -> Path:
    """The ``tiny`` model ``spec`` (seeded) with ``tokenizer``, saved as a Hugging Face directory at ``path``."""
    from steps.models import load_model

    load_model(spec, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
