"""Device, threads, allocator and memory, identical for both sides: CUDA (bf16 autocast) or CPU (fp32).

Threads and the malloc preset go into *both* children's environment (malloc alone moves CPU speed 22-54 %).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from benchmarks.spec import WorkerSpec

# Tuned glibc malloc: keep freed memory in the heap (no trim, big top pad) and serve blocks up to 32 MiB (the
# largest mmap threshold glibc accepts) from it, so activations are not mmapped, page-faulted and zeroed anew
# every step. Applied to both sides alike; ``--malloc default`` runs both with glibc's defaults instead.
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024**3),
    "MALLOC_TOP_PAD_": str(64 * 1024 * 1024),
}
MALLOC_PRESETS = {"tuned": TUNED_MALLOC_ENV, "default": {}}


def child_env(threads: int, malloc: str) -> dict[str, str]:
    """Environment for a benchmark child: the caller's, plus thread counts and the malloc preset."""
    if malloc not in MALLOC_PRESETS:
        raise ValueError(f"--malloc {malloc!r}: use one of {', '.join(MALLOC_PRESETS)}")
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("MALLOC_"):
            del env[key]  # both sides get exactly the preset, not whatever the shell had
    env.update(MALLOC_PRESETS[malloc])
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on GPU, "CPU <model name>" on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return f"CPU {model or platform.processor() or platform.machine()}".strip()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a timer reads the real step time (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vm_hwm_mb() -> float | None:
    """This process's peak resident set (VmHWM) in MiB, from /proc/self/status (Linux)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cuda_peak_mb(device: torch.device) -> float | None:
    """The CUDA caching allocator's peak in MiB (None on CPU)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def load_side(spec: WorkerSpec) -> tuple[torch.device, Any, Any, float, int, int]:
    """What both training sides start from: device, tokenizer, the fp32 SDPA model, its load time,
    the step count and how many synthetic examples cover it."""
    import time

    from benchmarks.spec import MODELS
    from steps.models import load_model, load_tokenizer

    device = pick_device()
    total_steps = spec.steps + spec.warmup_steps
    model_spec = MODELS[spec.model]
    tokenizer = load_tokenizer(model_spec)
    t0 = time.perf_counter()
    model = load_model(model_spec, dtype="float32", device=str(device), attn_implementation="sdpa")
    return device, tokenizer, model, time.perf_counter() - t0, total_steps, total_steps * spec.batch_size
