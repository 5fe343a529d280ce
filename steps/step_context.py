"""What every step of flows/pipeline.py works with besides its inputs, built once per step: the typed config, the
run's output root, the handoff store, the gang node and this machine's turn for heavy work."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from steps.config import RunConfig
from steps.locks import file_lock
from steps.model_store import ModelStore
from steps.train.gang import Gang


def setup_logging() -> None:
    """INFO to stdout (Metaflow's task log) unless the process configured logging itself."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)


@dataclass(frozen=True)
class StepContext:
    """One step's setting (:func:`step_context`): ``config`` is what the step runs with (a variant's own resolved
    config in the foreach steps), ``handoff`` where the run hands files between steps (None: a shared filesystem),
    ``gang`` this node's place in a @parallel gang (None: one node)."""

    config: RunConfig
    output_root: str
    handoff: dict | None = None
    gang: Gang | None = None

    def __post_init__(self) -> None:
        if self.gang is not None and self.gang.num_nodes == 1:  # a gang of one node is one node
            object.__setattr__(self, "gang", None)

    @property
    def node_index(self) -> int:
        return self.gang.node_index if self.gang is not None else 0

    @functools.cached_property
    def store(self) -> ModelStore | None:
        """The run's handoff store (None: a shared filesystem), opened where the step first touches its files."""
        return None if self.handoff is None else ModelStore.from_dict(self.handoff)

    def heavy_turn(self, what: str) -> contextlib.AbstractContextManager[None]:
        """This machine's turn for heavy work (training, generation, judging): :func:`cpu_heavy_section`."""
        return cpu_heavy_section(self.config, what)


def step_context(
    config: RunConfig, output_root: str, handoff: dict | None = None, gang: Gang | None = None
) -> StepContext:
    """A step's context, logging set up."""
    setup_logging()
    return StepContext(config, output_root, handoff, gang)


def device_lock_path() -> Path:
    """The machine-wide lock GPU steps take turns on: per user and per visible GPU set (``PREFFLOW_DEVICE_LOCK``
    names another file)."""
    override = os.environ.get("PREFFLOW_DEVICE_LOCK")
    if override:
        return Path(override)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all").replace(",", "_") or "none"
    return Path(tempfile.gettempdir()) / f"prefflow-gpu-{os.getuid()}-{visible}.lock"


@contextlib.contextmanager
def cpu_heavy_section(cfg: RunConfig, what: str, *, gpu: bool | None = None) -> Iterator[None]:
    """Let one heavy step (training, generation, judging) of a local run use the machine's compute at a time.

    Metaflow runs foreach branches in parallel. Without a GPU two torch processes each wanting every core thrash
    (measured: a 10x slower reference pass): they take turns on ``output_dir/.cpu-heavy.lock``
    (``resources.serialize_cpu_steps``). With GPUs, steps would start on the same GPUs at once: they take turns
    on a machine-wide lock (:func:`device_lock_path`, ``resources.serialize_gpu_steps``), except on Kubernetes,
    where each step gets its own node. ``gpu``: None = whether CUDA is available here.
    """
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    if gpu:
        if cfg.resources.kubernetes or not cfg.resources.serialize_gpu_steps:
            yield
            return
        lock = device_lock_path()
    else:
        if not cfg.resources.serialize_cpu_steps:
            yield
            return
        lock = Path(cfg.resources.output_dir).resolve() / ".cpu-heavy.lock"
    with file_lock(lock, what):
        yield
