"""Training checkpoints: Hugging Face ``save_pretrained`` weights plus optimizer, scheduler and RNG state.

A checkpoint directory is written under a temp name and renamed when complete, with a
``COMPLETE`` marker written last, so a kill mid-save never leaves a checkpoint that resume trusts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def save_model_dir(model, tokenizer, path: Path, merge_lora: bool = True, weights: dict | None = None) -> Path:
    """Write a reloadable model directory atomically.

    A LoRA model is merged into a plain model (``merge_lora``, for the final model the next step loads)
    or saved as its adapter only (checkpoints: resume restores the adapter onto the same base).
    ``weights``: the full state dict gathered from a sharded model (parallelism: fsdp) to write instead
    of the model's own (sharded) parameters.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if is_lora(model) and merge_lora:
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    if weights is not None:
        to_save.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    else:
        to_save.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / COMPLETE).write_text(json.dumps({"time": time.time()}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).exists()


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    progress: dict,
    keep: int = 1,
    weights: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """``weights`` / ``optimizer_state``: unsharded state gathered from an FSDP2 model (else the model's own)."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".step_{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model_dir = save_model_dir(model, tokenizer, tmp / "model", merge_lora=False, weights=weights)
    assert model_dir.exists()
    torch.save(
        {
            "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "progress": progress,
        },
        tmp / "trainer_state.pt",
    )
    (tmp / COMPLETE).write_text(json.dumps({"step": step, "time": time.time()}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint written: %s", final)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.exists():
        return []
    found = [p for p in ckpt_root.glob("step_*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; returns the saved progress."""
    from safetensors.torch import load_file

    from steps.train import parallel

    path = Path(path)
    state = {}
    for shard in sorted((path / "model").glob("*.safetensors")):
        state.update(load_file(shard))
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    if parallel.is_sharded(model):
        try:
            parallel.load_full_state(model, optimizer, state, trainer_state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RuntimeError(
                f"{path}: cannot resume this checkpoint with parallelism: fsdp ({exc}); "
                "resume with the parallelism it was written with, or start a new output dir"
            ) from exc
    else:
        _load_unsharded(path, model, optimizer, state, trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(trainer_state["rng"])
    log.info("resumed from %s (step %s)", path, trainer_state["progress"].get("step"))
    return trainer_state["progress"]


def _load_unsharded(path: Path, model, optimizer, state: dict, optimizer_state: dict) -> None:
    if is_lora(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{path}: adapter does not match the model (unexpected {result.unexpected_keys[:3]})")
        missing, unexpected = [], []
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
    # tied embeddings are saved once; anything else missing means a wrong checkpoint
    missing = [m for m in missing if "lm_head" not in m]
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    optimizer.load_state_dict(optimizer_state)
