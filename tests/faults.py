"""Faults the reliability tests inject from outside the product: a training process that stops right after a
checkpoint (in this process, :func:`stop_after_checkpoint`), a torchrun rank that SIGKILLs itself after its first one,
and flow steps that start on an empty local disk as fresh pods do (in the processes a flow run starts: put
:data:`HOOKS_DIR` first on their PYTHONPATH, see :func:`hooks_env`, and set the variables below)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Holds the ``sitecustomize`` module that installs the faults below in every Python process that has it on its path.
HOOKS_DIR = Path(__file__).resolve().parent / "process_hooks"
#: The global rank (torchrun's RANK) that SIGKILLs itself once its first checkpoint is complete on every rank.
KILL_RANK_ENV = "PREFFLOW_KILL_RANK_AFTER_CHECKPOINT"
#: "1": each step empties its node's local output root before it first touches its files (datastore handoff only).
WIPE_ENV = "PREFFLOW_WIPE_LOCAL_OUTPUT"

logger = logging.getLogger(__name__)


def hooks_env(repo: Path, **faults: str) -> dict[str, str]:
    """Environment for a flow run with ``faults`` ({KILL_RANK_ENV: "1", WIPE_ENV: "1"}): the hooks, then the repo."""
    return {"PYTHONPATH": f"{HOOKS_DIR}{os.pathsep}{repo}", **faults}


def _after_checkpoint(then: Callable[[int, Path], None]) -> Callable[[], None]:
    """Make ``steps.train.checkpoints.save_checkpoint`` (the loop calls it through the module) run ``then(step, path)``
    after each checkpoint it completes; returns the undo."""
    from steps.train import checkpoints

    save = checkpoints.save_checkpoint

    @functools.wraps(save)
    def save_then(ckpt_root: Path, step: int, *args: Any, **kwargs: Any) -> Path:
        path = save(ckpt_root, step, *args, **kwargs)
        then(step, path)
        return path

    checkpoints.save_checkpoint = save_then

    def undo() -> None:
        checkpoints.save_checkpoint = save

    return undo


@contextlib.contextmanager
def stop_after_checkpoint(step: int) -> Iterator[None]:
    """Inside the block, training raises KeyboardInterrupt right after writing the checkpoint of optimizer step
    ``step`` (or a later one): a process killed after a checkpoint, for the resume tests (every rank of a process group
    raises at the same step)."""

    def stop(saved: int, path: Path) -> None:
        if saved >= step:
            raise KeyboardInterrupt(f"stopped after writing {path} (step {saved})")

    undo = _after_checkpoint(stop)
    try:
        yield
    finally:
        undo()


def kill_rank_after_checkpoint(rank: int) -> None:
    """This process (global rank ``rank``) dies by SIGKILL once its first checkpoint is complete on every rank (the
    writer's last barrier has passed), as a node lost mid-training would."""

    def die(step: int, path: Path) -> None:
        logger.error("%s=%d: rank %d kills itself (SIGKILL) after writing %s", KILL_RANK_ENV, rank, rank, path)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

    _after_checkpoint(die)


def start_steps_on_empty_disks() -> None:
    """Each step's first use of its handoff store empties this node's local output root (gang node k > 0: its own
    root beside it), so everything a step reads must come back from the datastore, as on a pod that shares nothing."""
    from steps.model_store import node_root
    from steps.step_context import StepContext

    open_store = StepContext.__dict__["store"].func

    def store_on_an_empty_disk(ctx: StepContext) -> Any:
        if ctx.handoff is not None:
            local = Path(ctx.output_root if ctx.node_index == 0 else node_root(ctx.output_root, ctx.node_index))
            if _alone_on(local) and local.exists():
                logger.warning("%s=1: deleting the local output root %s (it comes from the datastore)", WIPE_ENV, local)
                shutil.rmtree(local)
            _share_after_wipe()
        return open_store(ctx)

    store = functools.cached_property(store_on_an_empty_disk)
    store.__set_name__(StepContext, "store")
    StepContext.store = store  # type: ignore[method-assign,assignment]


_IN_USE: list[int] = []  # this process's shared locks on the local roots it works in (held until it exits)


def _alone_on(local: Path) -> bool:
    """Whether no other step process works in ``local`` now: a pod's disk is its own, but the foreach tasks of one
    local run share this machine's, so wiping it under a sibling (e.g. evaluate[sft] while evaluate[dpo] starts)
    would delete what that sibling already pulled. This process then holds a shared lock on it until it exits."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(local.parent / f".{local.name}.in-use", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    if not alone:
        fcntl.flock(fd, fcntl.LOCK_SH)
    _IN_USE.append(fd)
    return alone


def _share_after_wipe() -> None:
    for fd in _IN_USE:
        fcntl.flock(fd, fcntl.LOCK_SH)  # an exclusive lock taken to wipe becomes shared once the wipe is done


def install_from_environment() -> None:
    """What ``process_hooks/sitecustomize.py`` runs at every interpreter start: the faults the environment asks for."""
    rank = os.environ.get(KILL_RANK_ENV, "")
    if rank and os.environ.get("RANK") == rank and "LOCAL_RANK" in os.environ:  # a torchrun rank: the target
        kill_rank_after_checkpoint(int(rank))
    if os.environ.get(WIPE_ENV, "") not in ("", "0"):
        start_steps_on_empty_disks()
