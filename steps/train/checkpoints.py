"""Trainer checkpoints through ``torch.distributed.checkpoint`` (every rank writes and reads only its shard) and
the Hugging Face export a later step loads. Checkpoints and model directories are written under a temp name, marked
``COMPLETE`` last and published by one rename (steps.io), so a kill mid-save never leaves one that resume trusts."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steps.io import atomic_write_bytes, atomic_write_text, discard_dir, publish_dir, remove_leftovers
from steps.train import collectives, parallel

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_DIR = "state"  # DCP: model and AdamW state, one file per rank plus .metadata
TRAINER_FILE = "trainer_state.pt"  # scheduler and progress (small; rank 0 writes it)
RNG_DIR = "rng"  # one file per rank


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that cannot be restored into this model and optimizer."""


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


def save_model_dir(
    model: Any, tokenizer: Any, path: Path, merge_lora: bool = True, weights: dict | None = None
) -> Path:
    """Write a reloadable Hugging Face model directory atomically (a LoRA model merged into a plain one): a
    previous ``path`` stays whole until the new one replaces it in one step; modes follow the umask.

    ``weights``: the full state dict gathered from a sharded model to write instead of its own parameters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)  # temp directories of a save that was killed (one writer per model directory)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    to_save = model
    if is_lora(model) and merge_lora:
        to_save = copy.deepcopy(model).merge_and_unload()
    if weights is not None:
        to_save.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    else:
        to_save.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / COMPLETE, json.dumps({"time": time.time()}))
    return publish_dir(tmp, path)


def export_model(model: Any, tokenizer: Any, path: Path) -> Path:
    """The trained model as a Hugging Face directory in its master dtype (every update kept), for the next step.

    Called on every rank: a sharded model is gathered once (CPU offload, rank 0 holds it) and rank 0 writes."""
    weights = parallel.full_state_dict(model)
    if collectives.world()[0] == 0:
        save_model_dir(parallel.unwrap(model), tokenizer, path, weights=weights)
    collectives.barrier(parallel.device_of(model))
    return Path(path)


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).exists()


def rng_state(device: torch.device) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters (a LoRA base) are not trainer state: adapter-only checkpoints
    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def _trainer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """DCP-shaped model and AdamW state; a tied output embedding is kept once (under the input embedding)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    tied = parallel.tied_embedding_keys(parallel.unwrap(model))
    if tied is not None:
        model_state.pop(parallel.ROOT_PREFIX + tied[0], None)
    return {"model": model_state, "optimizer": optim_state}


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes" one process when there is no process group: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(
    ckpt_root: Path, step: int, model: Any, optimizer: Any, scheduler: Any, progress: dict, keep: int = 1
) -> Path:
    """Write ``ckpt_root/step_NNNNNNN`` (called on every rank): each rank its shard of the weights and AdamW
    state (DCP), its RNG; rank 0 the scheduler and progress, then the marker and the rename."""
    import torch.distributed.checkpoint as dcp

    rank, world_size = collectives.world()
    device = parallel.device_of(model)
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".step_{step:07d}.tmp"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for leftover in list(ckpt_root.glob(".step_*")):  # temp or discarded checkpoints of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    collectives.barrier(device)
    with _quiet_single_process():
        dcp.save(_trainer_state(model, optimizer), checkpoint_id=str(tmp / STATE_DIR))
    atomic_write_bytes(tmp / RNG_DIR / f"rank_{rank}.pt", _torch_bytes(rng_state(device)))
    if rank == 0:
        trainer = {"scheduler": scheduler.state_dict(), "progress": progress, "world_size": world_size}
        atomic_write_bytes(tmp / TRAINER_FILE, _torch_bytes(trainer))
    collectives.barrier(device)
    if rank == 0:
        atomic_write_text(tmp / COMPLETE, json.dumps({"step": step, "time": time.time(), "world_size": world_size}))
        publish_dir(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            discard_dir(old)  # renamed first: a kill mid-delete never leaves a step_* that looks complete
        logger.info("checkpoint written: %s (%d rank shards)", final, world_size)
    collectives.barrier(device)
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


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    """Restore weights, AdamW state, scheduler and RNG in place (every rank reads its own shard); returns progress.

    Keys are ``lm.<Hugging Face key>`` under every parallelism, so DCP reshards a checkpoint written by another
    world size or parallelism (ddp, fsdp, one process) into this one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    rank, world_size = collectives.world()
    device = parallel.device_of(model)
    if not (path / STATE_DIR / ".metadata").exists():
        raise CheckpointMismatchError(
            f"{path}: no {STATE_DIR}/ (torch.distributed.checkpoint) inside: written by an older PrefFlow; "
            "start a new output dir"
        )
    state = _trainer_state(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path / STATE_DIR))
    except Exception as exc:  # DCP raises CheckpointException (not a RuntimeError) for missing or odd keys
        raise CheckpointMismatchError(
            f"{path}: checkpoint does not match the model being trained ({str(exc)[:500]}); resume with the "
            "same model (and LoRA settings), or start a new output dir"
        ) from exc
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_options(strict=False),  # frozen (LoRA base) and tied weights are not in the checkpoint by design
    )
    trainer = torch.load(path / TRAINER_FILE, weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    rng_file = path / RNG_DIR / f"rank_{rank}.pt"
    if trainer.get("world_size", world_size) != world_size:
        logger.warning(
            "%s was written by %s ranks, resuming on %d: weights and optimizer state are resharded; the rest of "
            "the epoch is regrouped into steps of this world size",
            path,
            trainer.get("world_size"),
            world_size,
        )
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False), device)
    logger.info("resumed from %s (step %s)", path, trainer["progress"].get("step"))
    return trainer["progress"]
