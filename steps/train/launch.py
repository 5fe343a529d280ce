"""Run a training job on one process, on N processes of this node through torchrun, or on every node of a Metaflow
@parallel gang (one torchrun per node, one rendezvous). ``python -m steps.train.launch`` is the per-rank entry point;
the config crosses that boundary as JSON, once, and global rank 0's :class:`steps.results.TrainResult` comes back
the same way. From a flow step: ``pipeline.train_sft -> train_on_node -> recipes.run_sft -> loop.train``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.config import RunConfig
from steps.io import atomic_write_bytes, read_json, write_json
from steps.model_store import node_root
from steps.results import TrainResult
from steps.train.checkpoint_sync import CheckpointSync
from steps.train.gang import Gang, GangCoordinator, run_node, torchrun_node_args, visible_devices_for

if TYPE_CHECKING:
    from steps.step_context import StepContext

logger = logging.getLogger(__name__)

CONFIG_FILE = "launch_config.pkl"
SUMMARY_FILE = "launch_summary.json"
#: The CUDA caching allocator's settings for training unless the user gave their own: expandable segments keep
#: varying sequence lengths from fragmenting GPU memory (PyTorch's advice; torchtitan sets it too).
ALLOC_CONF = "expandable_segments:True"
#: Its environment variable: the newer name (torch >= 2.9, read first), and the one every supported torch reads.
ALLOC_CONF_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


@dataclass
class NodeRun:
    """How this process takes part: its gang (None: a single node), the gang's coordinator, and the checkpoint
    sync with the datastore (None: checkpoints stay on a disk every node and retry sees)."""

    gang: Gang | None = None
    coordinator: GangCoordinator | None = None
    sync: CheckpointSync | None = None

    def __post_init__(self) -> None:
        if self.gang is not None and self.gang.num_nodes == 1:  # a gang of one node is a single node
            self.gang, self.coordinator = None, None


def recipe(
    cfg: RunConfig, kind: str, data_dir: str, out_dir: str, sft_model_dir: str | None
) -> Callable[[], TrainResult]:
    """The recipe call that trains ``kind`` ("sft" or a loss name) into ``out_dir``, bound and not yet made: each
    launcher makes it itself, so no frame of this module stands between a flow step and the training loop."""
    from steps.train.recipes import run_preference, run_sft

    if kind == "sft":
        return functools.partial(run_sft, cfg, Path(data_dir), Path(out_dir))
    return functools.partial(run_preference, cfg, kind, Path(data_dir), Path(out_dir), sft_model_dir=sft_model_dir)


def write_launch_config(cfg: RunConfig, path: Path) -> Path:
    """The planned config for the ranks, pickled: torchrun starts fresh interpreters, which take the checked
    dataclasses as they are instead of typing and checking the config again."""
    return atomic_write_bytes(path, pickle.dumps(cfg))


def read_launch_config(path: str | Path) -> RunConfig:
    cfg = pickle.loads(Path(path).read_bytes())
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"{path} holds a {type(cfg).__name__}, not the RunConfig write_launch_config writes")
    return cfg


def train_on_node(
    ctx: StepContext, kind: str, name: str, data_dir: str, sft_model_dir: str | None
) -> TrainResult | None:
    """A flow step's training of ``kind`` into ``output_root/name``: inputs pulled first when nodes share no disk
    (``ctx.store``), checkpoints synced with the datastore while it trains, the model pushed after. Node 0 (or the
    only node) takes this machine's heavy-step turn, picks the checkpoint to resume from and tells the other nodes,
    which wait for it. Returns global rank 0's result where it ran (this node), else None."""
    cfg, store, gang = ctx.config, ctx.store, ctx.gang
    out_dir = Path(ctx.output_root) / name
    on_other_node = gang is not None and not gang.is_main
    local_out = node_root(ctx.output_root, ctx.node_index) / name if on_other_node and store else out_dir
    resources = cfg.resources
    coordinator = (
        GangCoordinator(gang, resources.process_group_timeout_s, resources.join_timeout_s(not gang.on_one_machine))
        if gang
        else None
    )
    with ctx.heavy_turn(name) if not on_other_node else contextlib.nullcontext():
        plan = coordinator.wait_plan() if coordinator is not None and on_other_node else None
        sync = None
        if store is not None:
            store.ensure_all(data_dir, sft_model_dir)
            sync = CheckpointSync(store, local_out, out_dir, gang, coordinator)
            plan = sync.prepare(plan)
        if coordinator is not None and not on_other_node:
            coordinator.publish_plan(plan or {})
        result: TrainResult | None
        if gang is None and resources.nproc_per_node <= 1:
            with in_process(sync):
                result = recipe(cfg, kind, data_dir, str(local_out), sft_model_dir)()
        else:
            node = NodeRun(gang, coordinator, sync)
            result = launch_torchrun(cfg, kind, data_dir, str(local_out), sft_model_dir, resources.nproc_per_node, node)
    if result is not None and store is not None:
        store.push(Path(result.model_dir))
    return result


def launch(
    cfg: RunConfig,
    kind: str,
    data_dir: str,
    out_dir: str,
    sft_model_dir: str | None = None,
    nproc_per_node: int = 1,
    node: NodeRun | None = None,
) -> TrainResult | None:
    """Train ``kind`` ("sft" or a loss name); returns global rank 0's result (on a gang: node 0's; None elsewhere).

    ``cfg``: the RunConfig planned for this variant (preference resolved for ``kind``: steps.config.for_loss).
    ``node``: this node's gang and checkpoint sync (None: one node, local disk).
    """
    node = node or NodeRun()
    if node.gang is None and nproc_per_node <= 1:
        with in_process(node.sync):
            return recipe(cfg, kind, data_dir, out_dir, sft_model_dir)()
    return launch_torchrun(cfg, kind, data_dir, out_dir, sft_model_dir, nproc_per_node, node)


@contextlib.contextmanager
def in_process(sync: CheckpointSync | None, every_s: float = 1.0) -> Iterator[None]:
    """Around training in this process: the allocator settings (:func:`configure_allocator_here`) and, with a
    ``sync``, checkpoint uploads beside it (a thread; torch releases the GIL in its kernels)."""
    configure_allocator_here()
    if sync is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            sync.poll()

    thread = threading.Thread(target=loop, name="checkpoint-sync", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sync.flush()


def launch_torchrun(
    cfg: RunConfig,
    kind: str,
    data_dir: str,
    out_dir: str,
    sft_model_dir: str | None,
    nproc_per_node: int,
    node: NodeRun | None = None,
) -> TrainResult | None:
    """``nproc_per_node`` ranks of this node under torchrun (one rank too: a real process group of one, so
    DDP/FSDP2 and every collective run, e.g. on NCCL for the GPU check); on a gang this node's share of the job,
    joined to node 0's rendezvous. Returns rank 0's result where rank 0 ran (this node), else None."""
    node = node or NodeRun()
    gang = node.gang
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = write_launch_config(cfg, out / CONFIG_FILE)
    timeout = cfg.resources.process_group_timeout_s
    where = ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    env = {**os.environ, **cfg.resources.env_vars()}  # resources.env: NCCL and fabric settings, as on the pods
    allocator_env(env)
    if gang is not None:
        where = torchrun_node_args(gang, nproc_per_node, timeout)
        devices = visible_devices_for(gang, nproc_per_node, _cuda_device_count())
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        "-m",
        "steps.train.launch",
        "--config-file",
        str(config_path),
        "--kind",
        kind,
        "--data-dir",
        data_dir,
        "--out-dir",
        out_dir,
    ] + (["--sft-model-dir", sft_model_dir] if sft_model_dir else [])
    if gang is None or gang.is_main:
        (out / SUMMARY_FILE).unlink(missing_ok=True)  # a previous attempt's
    label = f"node {gang.node_index} of {gang.num_nodes}: " if gang else ""
    logger.info("%slaunching %d ranks: %s", label, nproc_per_node, " ".join(cmd))
    sync = node.sync
    run_node(
        cmd,
        env,
        gang,
        node.coordinator if gang else None,
        on_poll=sync.poll if sync else None,
        on_exit=sync.flush if sync else None,
    )
    if gang is not None and not gang.is_main:
        return None  # global rank 0 ran on node 0 (on a shared disk its summary is visible here too)
    return TrainResult.from_dict(read_json(out / SUMMARY_FILE), str(out / SUMMARY_FILE))


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def process_group_options(cuda: bool, local_rank: int) -> tuple[str, dict[str, Any]]:
    """(backend, keyword arguments) of ``init_process_group``: NCCL bound to the rank's GPU (``device_id``: the
    communicator is created on that device up front, and no collective or barrier guesses a device) on CUDA; gloo
    with nothing more on CPU."""
    if not cuda:
        return "gloo", {}
    import torch

    return "nccl", {"device_id": torch.device("cuda", local_rank)}


def init_process_group(timeout_s: float) -> str:
    """NCCL on GPUs (every collective tensor lives on the rank's GPU), gloo on CPU; returns the backend."""
    import datetime

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend, options = process_group_options(torch.cuda.is_available(), local_rank)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **options)
    return backend


def allocator_env(env: MutableMapping[str, str]) -> bool:
    """Put :data:`ALLOC_CONF` into ``env`` unless the user set either of its names; returns whether it did."""
    if any(name in env for name in ALLOC_CONF_NAMES):
        return False
    env[ALLOC_CONF_NAMES[1]] = ALLOC_CONF
    return True


def configure_allocator_here() -> None:
    """:func:`allocator_env` for this process, which only takes effect before CUDA initialises here (said if late)."""
    import torch

    if not torch.cuda.is_initialized():
        allocator_env(os.environ)
    elif not any(name in os.environ for name in ALLOC_CONF_NAMES):
        logger.warning(
            "CUDA is already initialised in this process: %s=%s not applied", ALLOC_CONF_NAMES[1], ALLOC_CONF
        )


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config-file", required=True)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--sft-model-dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(name)s: %(message)s")
    cfg = read_launch_config(args.config_file)
    configure_allocator_here()  # ranks started by another launcher than launch_torchrun
    backend = init_process_group(cfg.resources.process_group_timeout_s)
    logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    try:
        result = recipe(cfg, args.kind, args.data_dir, args.out_dir, args.sft_model_dir)()
        if dist.get_rank() == 0:
            write_json(Path(args.out_dir) / SUMMARY_FILE, result.to_dict())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
