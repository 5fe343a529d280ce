"""The peak MFU is taken against: bf16 data-sheet table on GPU, fp32 GEMM probe of the model's shapes on CPU.

``python -m benchmarks.probe '<ProbeSpec JSON>'`` runs it in its own process, under the sides' environment.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks import flops, hardware

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MAX_PROBE_ROWS = 2048  # GEMM efficiency has saturated well before this many rows


@dataclass
class ProbeSpec:
    gemm_shapes: list[list[int]]  # [in_features, out_features, count] per distinct nn.Linear shape
    rows: int  # tokens per GEMM (the rows of a micro-batch)
    threads: int
    out: str
    repeats: int = 3

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class PeakResult:
    device: str
    peak_flops: float | None
    source: str  # "bf16 data sheet" or "fp32 GEMM probe"
    gemms: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _training_gemms(
    x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, y: torch.Tensor, dx: torch.Tensor, dw: torch.Tensor
) -> None:
    """The three GEMMs a trained Linear runs per step: forward, input gradient, weight gradient."""
    import torch

    torch.mm(x, w.t(), out=y)
    torch.mm(dy, w, out=dx)
    torch.mm(dy.t(), x, out=dw)


def gemm_probe(shapes: Sequence[Sequence[int]], rows: int, repeats: int = 3) -> tuple[float, list[dict[str, Any]]]:
    """fp32 FLOP/s of a training step's GEMMs on these Linear shapes, ``rows`` tokens each, best of ``repeats``:
    per W [out, in] Y = X W^T, dX = dY W, dW = dY^T X (2 rows in out FLOPs each), shapes weighted by count."""
    import torch

    if rows < 1 or repeats < 1 or not shapes:
        raise ValueError(f"gemm_probe needs rows >= 1, repeats >= 1 and shapes; got {rows}, {repeats}, {shapes}")
    gen = torch.Generator().manual_seed(0)
    total_flops = total_time = 0.0
    detail = []
    for d_in, d_out, count in shapes:
        x, dy = torch.randn(rows, d_in, generator=gen), torch.randn(rows, d_out, generator=gen)
        w = torch.randn(d_out, d_in, generator=gen)
        outs = torch.empty(rows, d_out), torch.empty(rows, d_in), torch.empty(d_out, d_in)
        _training_gemms(x, w, dy, *outs)  # warm-up: first-touch page faults and BLAS set-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            _training_gemms(x, w, dy, *outs)
            best = min(best, time.perf_counter() - t0)
        work = 3 * 2.0 * rows * d_in * d_out
        total_flops += count * work
        total_time += count * best
        detail.append(
            {"in": d_in, "out": d_out, "count": count, "seconds": best, "gflops_per_s": round(work / best / 1e9, 2)}
        )
    return total_flops / total_time, detail


def device_peak(spec: ProbeSpec) -> PeakResult:
    """The data-sheet peak on a GPU (no measurement), else the GEMM probe at ``spec.threads`` threads."""
    import torch

    device = hardware.pick_device()
    name = hardware.device_name(device)
    if device.type == "cuda":
        return PeakResult(name, flops.peak_bf16_flops(name), "bf16 data sheet")
    torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    peak, detail = gemm_probe(spec.gemm_shapes, min(spec.rows, MAX_PROBE_ROWS), spec.repeats)
    return PeakResult(name, peak, "fp32 GEMM probe", detail, time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    from steps.io import atomic_write_text

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        print("usage: python -m benchmarks.probe '<ProbeSpec JSON>'", file=sys.stderr)
        return 2
    spec = ProbeSpec(**json.loads(argv[0]))
    result = device_peak(spec)
    atomic_write_text(spec.out, json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
