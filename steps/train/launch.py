"""Run a training job on one process, or on N processes of this node through torchrun (DDP/FSDP-style).

``python -m steps.train.launch`` is the per-rank entry point; the config crosses that boundary as JSON, once."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from steps.config import RunConfig, config_from_dict, config_to_dict, for_loss
from steps.io import read_json, write_json

logger = logging.getLogger(__name__)

CONFIG_FILE = "launch_config.json"
SUMMARY_FILE = "launch_summary.json"


def _run_here(cfg: RunConfig, kind: str, data_dir: str, out_dir: str, sft_model_dir: str | None) -> dict:
    from steps.train.recipes import run_preference, run_sft

    if kind == "sft":
        return run_sft(cfg, Path(data_dir), Path(out_dir)).as_dict()
    return run_preference(cfg, kind, Path(data_dir), Path(out_dir), sft_model_dir=sft_model_dir).as_dict()


def write_launch_config(cfg: RunConfig, path: Path) -> Path:
    """The config for the ranks: plain JSON (torchrun starts fresh interpreters)."""
    return write_json(path, {"source": cfg.source, "config": config_to_dict(cfg)})


def read_launch_config(path: str | Path) -> RunConfig:
    doc = read_json(path)
    return config_from_dict(doc["config"], doc["source"])


def launch(
    config: RunConfig | Mapping,
    kind: str,
    data_dir: str,
    out_dir: str,
    sft_model_dir: str | None = None,
    nproc_per_node: int = 1,
) -> dict:
    """Train ``kind`` ("sft" or a loss name); returns the run summary dict.

    ``config``: the RunConfig planned for this variant (preference resolved for ``kind``), or a plain mapping,
    which is typed and resolved here.
    """
    if isinstance(config, RunConfig):
        cfg = config
    else:
        cfg = config_from_dict(config, str(config.get("name", "config")))
        cfg = cfg if kind == "sft" else for_loss(cfg, kind)
    if nproc_per_node <= 1:
        return _run_here(cfg, kind, data_dir, out_dir, sft_model_dir)
    return launch_torchrun(cfg, kind, data_dir, out_dir, sft_model_dir, nproc_per_node)


def launch_torchrun(
    cfg: RunConfig, kind: str, data_dir: str, out_dir: str, sft_model_dir: str | None, nproc_per_node: int
) -> dict:
    """``nproc_per_node`` ranks of this node under torchrun (one rank too: a real process group of one, so
    DDP/FSDP2 and every collective run, e.g. on NCCL for the GPU check); returns rank 0's summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = write_launch_config(cfg, out / CONFIG_FILE)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m",
        "steps.train.launch",
        "--config-json",
        str(config_path),
        "--kind",
        kind,
        "--data-dir",
        data_dir,
        "--out-dir",
        out_dir,
    ] + (["--sft-model-dir", sft_model_dir] if sft_model_dir else [])
    logger.info("launching %d ranks: %s", nproc_per_node, " ".join(cmd))
    subprocess.run(cmd, check=True)
    return read_json(out / SUMMARY_FILE)


def init_process_group(timeout_s: float) -> str:
    """NCCL on GPUs (every collective tensor lives on the rank's GPU), gloo on CPU; returns the backend."""
    import datetime

    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--sft-model-dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(name)s: %(message)s")
    cfg = read_launch_config(args.config_json)
    backend = init_process_group(cfg.resources.process_group_timeout_s)
    logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    try:
        summary = _run_here(cfg, args.kind, args.data_dir, args.out_dir, args.sft_model_dir)
        if dist.get_rank() == 0:
            write_json(Path(args.out_dir) / SUMMARY_FILE, summary)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
