"""One side of one benchmark task in its own process: ``python -m benchmarks.worker '<WorkerSpec JSON>'``.

Its own process, so its peak memory is its own; the parent gives both sides one environment. Result: ``spec.out``.
"""

from __future__ import annotations

import json
import logging
import sys

from benchmarks.spec import TRAIN_TASKS, SideResult, WorkerSpec


def run(spec: WorkerSpec) -> SideResult:
    """Run the side and task ``spec`` names at ``spec.threads`` torch threads."""
    import torch

    torch.set_num_threads(spec.threads)
    if spec.task == "generate":
        from benchmarks.prefflow_side import run_generation

        if spec.side == "prefflow":
            return run_generation(spec, spec.gen_batch_size, "prefflow")
        return run_generation(spec, 1, "baseline")
    if spec.task not in TRAIN_TASKS:
        raise ValueError(f"unknown task {spec.task!r}")
    if spec.side == "prefflow":
        from benchmarks.prefflow_side import run_training

        return run_training(spec)
    from benchmarks.trl_side import run_training

    return run_training(spec)


def main(argv: list[str]) -> int:
    """Entry point: read the spec from argv, write the result JSON atomically."""
    from steps.io import atomic_write_text

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        print("usage: python -m benchmarks.worker '<WorkerSpec JSON>'", file=sys.stderr)
        return 2
    spec = WorkerSpec.from_json(argv[0])
    result = run(spec)
    atomic_write_text(spec.out, json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
