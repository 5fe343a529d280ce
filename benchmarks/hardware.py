"""Device, threads, allocator and memory facts the benchmark needs, identical for both sides.

* Device: CUDA when present (bf16 autocast over fp32 weights, SDPA attention), else CPU in fp32.
* Threads and glibc malloc settings are put in the environment of *both* child processes before they start:
  malloc settings alone move CPU throughput by 22-54 % here, so the two sides must share them.
* Peak memory: each side runs in its own process; the parent reads that child's ``ru_maxrss`` from
  ``wait4`` and the child reports ``VmHWM`` (and the CUDA allocator's peak on GPU).
* MFU = 6 x parameters x tokens/s / peak dense bf16 FLOP/s of the GPU (table below, by device name).
"""
from __future__ import annotations

import os
import re
from typing import Optional

# Tuned glibc malloc: keep freed memory in the heap (no trim, big top pad) and serve blocks up to 32 MiB (the
# largest mmap threshold glibc accepts) from it, so activations are not mmapped, page-faulted and zeroed anew
# every step. Applied to both sides alike; ``--malloc default`` runs both with glibc's defaults instead.
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024 ** 3),
    "MALLOC_TOP_PAD_": str(64 * 1024 * 1024),
}
MALLOC_PRESETS = {"tuned": TUNED_MALLOC_ENV, "default": {}}

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's data sheets. Matched on the device name,
# most specific first. Unknown GPUs report no MFU rather than a guess.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("A6000", 155.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s for a CUDA device name (``torch.cuda.get_device_name``), or None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if re.search(re.escape(key), device_name, flags=re.IGNORECASE):
            return tflops * 1e12
    return None


def mfu(params: int, tokens_per_s: float, device_name: str) -> Optional[float]:
    """Model FLOPs utilisation: 6 N T / peak (forward + backward of a dense decoder, attention not counted)."""
    peak = peak_bf16_flops(device_name)
    if peak is None or tokens_per_s <= 0:
        return None
    return 6.0 * params * tokens_per_s / peak


def child_env(threads: int, malloc: str) -> dict[str, str]:
    """Environment for a benchmark child: the caller's, plus thread counts and the malloc preset."""
    if malloc not in MALLOC_PRESETS:
        raise ValueError(f"--malloc {malloc!r}: use one of {', '.join(MALLOC_PRESETS)}")
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("MALLOC_"):
            del env[key]  # both sides get exactly the preset, not whatever the shell had
    env.update(MALLOC_PRESETS[malloc])
    env.update({
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    })
    return env


def pick_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device) -> str:
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


def synchronize(device) -> None:
    """Wait for queued GPU work so a timer reads the real step time (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vm_hwm_mb() -> Optional[float]:
    """This process's peak resident set (VmHWM) in MiB, from /proc/self/status (Linux)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cuda_peak_mb(device) -> Optional[float]:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def load_side(spec):
    """What both sides of a training comparison start from: device, tokenizer, the fp32 SDPA model
    (load time measured apart), the step count and how many synthetic examples cover it."""
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
