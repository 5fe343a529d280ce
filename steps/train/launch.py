"""Run a training job on one process, or on N processes of this node through torchrun (DDP-style).

``python -m steps.train.launch`` is the per-rank entry point torchrun starts; the flow calls
:func:`launch`, which picks in-process or torchrun from ``resources.nproc_per_node``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from steps.config import config_from_dict
from steps.io import read_json, write_json

log = logging.getLogger(__name__)


def _run_here(raw_config: dict, kind: str, data_dir: str, out_dir: str, sft_model_dir: Optional[str]) -> dict:
    from steps.train.recipes import run_preference, run_sft

    cfg = config_from_dict(raw_config, raw_config.get("name", "config"))
    if kind == "sft":
        return run_sft(cfg, Path(data_dir), Path(out_dir)).as_dict()
    return run_preference(cfg, kind, Path(data_dir), Path(out_dir), sft_model_dir=sft_model_dir).as_dict()


def launch(raw_config: dict, kind: str, data_dir: str, out_dir: str, sft_model_dir: Optional[str] = None,
           nproc_per_node: int = 1) -> dict:
    """Train ``kind`` ("sft" or a loss name); returns the run summary dict."""
    if nproc_per_node <= 1:
        return _run_here(raw_config, kind, data_dir, out_dir, sft_model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = write_json(out / "launch_config.json", raw_config)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
           "-m", "steps.train.launch", "--config-json", str(config_path), "--kind", kind,
           "--data-dir", data_dir, "--out-dir", out_dir] + (["--sft-model-dir", sft_model_dir] if sft_model_dir else [])
    log.info("launching %d ranks: %s", nproc_per_node, " ".join(cmd))
    subprocess.run(cmd, check=True)
    return read_json(out / "launch_summary.json")


def main(argv: Optional[list[str]] = None) -> None:
    import torch
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config-json", required=True)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--sft-model-dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(name)s: %(message)s")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        summary = _run_here(read_json(args.config_json), args.kind, args.data_dir, args.out_dir, args.sft_model_dir)
        if dist.get_rank() == 0:
            write_json(Path(args.out_dir) / "launch_summary.json", json.loads(json.dumps(summary, default=str)))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
