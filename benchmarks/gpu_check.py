"""``make gpu-check`` (``PYTHONPATH=. python3 -m benchmarks.gpu_check``): on one CUDA GPU from a plain checkout (no
install step, no model cache, no network), one JSON object on stdout. Random-init Llama models from the
repository's configs (``configs/models``) with the repository's tokenizer run:

* ``dpo_precision``: DPO at lr 1e-8 through the real path (RunConfig, ``launch_torchrun``, one rank, NCCL) under
  FSDP2, bf16 compute over fp32 master weights against fp32 compute: the weights move, step 1 is ln 2 (logits 0),
  the bf16 losses track fp32;
* ``gradient_checkpointing``: the same bf16 run with ``model.gradient_checkpointing: true`` matches it;
* ``process_group``: a DDP checkpoint resumed under FSDP2 (every collective, DCP resharding);
* ``logprob_128k``: the log-prob path of the 8B-width slice (128k vocabulary) at 8,192 tokens with gradients,
  checked against plain logits and cross-entropy; peak GPU memory;
* ``throughput``: SFT and DPO tokens/s and MFU on the ~1B config, peak GPU memory per phase;
* ``generation``: HF generation tokens/s (vLLM when installed).

``--device cpu`` is the dry run the test suite runs (tiny sizes of the same configs, gloo instead of NCCL). Each
section is timed; a failing one is recorded with its traceback and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.spec import MODELS, ONE_B_TINY_OVERRIDES

logger = logging.getLogger("benchmarks.gpu_check")

ONE_B = MODELS["1b"]
SLICE_8B = "random:llama3.1-8b-slice"
#: The dry run's sizes: the same configs, narrowed; the 1B with a small vocabulary, the slice keeps its 128k rows.
TINY_1B = ONE_B_TINY_OVERRIDES
TINY_SLICE = {k: v for k, v in ONE_B_TINY_OVERRIDES.items() if k not in ("num_hidden_layers", "vocab_size")}


def with_overrides(spec: str, overrides: dict[str, Any]) -> str:
    """``random:<dir>`` with LlamaConfig overrides (``random:<dir>:{json}``)."""
    return f"{spec}:{json.dumps(overrides, separators=(',', ':'), sort_keys=True)}"


# What each device runs. cuda: real sizes on one H100 in under 8 minutes (estimates in the README); cpu: the dry run.
PROFILES: dict[str, dict[str, Any]] = {
    "cuda": {
        "model": ONE_B,
        "small_model": with_overrides(ONE_B, {"num_hidden_layers": 2}),  # the resume round trip
        "slice_model": SLICE_8B,
        "dpo": {"pairs": 16, "max_len": 512, "batch_pairs": 4, "steps": 4},
        "logprob": {"rows": 4, "row_tokens": 2048},
        "bench": {"model": "1b", "steps": 8, "warmup": 2, "batch": 8, "max_len": 1024},
        "gen": {"prompts": 32, "tokens": 128, "batch": 16},
    },
    "cpu": {
        "model": with_overrides(ONE_B, TINY_1B),
        "small_model": with_overrides(ONE_B, TINY_1B),
        "slice_model": with_overrides(SLICE_8B, TINY_SLICE),
        "dpo": {"pairs": 12, "max_len": 256, "batch_pairs": 4, "steps": 3},
        "logprob": {"rows": 2, "row_tokens": 512},
        "bench": {"model": "1b-tiny", "steps": 2, "warmup": 1, "batch": 4, "max_len": 256},
        "gen": {"prompts": 4, "tokens": 8, "batch": 4},
    },
}
SECTIONS = ("dpo_precision", "gradient_checkpointing", "process_group", "logprob_128k", "throughput", "generation")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the dry run (tiny sizes, gloo)")
    ap.add_argument("--out", help="also write the JSON object here")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    unknown = {s for s in args.skip.split(",") if s} - set(SECTIONS)
    if unknown:
        ap.error(f"--skip: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    return args


def _timed(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section; a failure is recorded (with its traceback tail) and the others still run."""
    logger.warning("section %s ...", name)
    t0 = time.perf_counter()
    try:
        result = {"ok": True, **fn()}
    except Exception as exc:  # one broken section must not hide the others' numbers
        logger.exception("%s failed", name)
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    logger.warning(
        "section %s: %s in %.1f s", name, "ok" if result.get("passed", result["ok"]) else "FAILED", result["seconds"]
    )
    _free()
    return result


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _environment(device: Any) -> dict[str, Any]:
    """What ran: device, library versions, and the checkout the code came from."""
    import torch
    import transformers

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "checkout": str(Path(__file__).resolve().parents[1]),
    }


def _sections(profile: dict[str, Any], device: Any, work: Path) -> dict[str, Callable[[], dict[str, Any]]]:
    from benchmarks import gpu_rates, gpu_training

    runs = gpu_training.TorchrunRuns(profile, work)
    return {
        "dpo_precision": lambda: gpu_training.dpo_precision(runs, device),
        "gradient_checkpointing": lambda: gpu_training.gradient_checkpointing(runs),
        "process_group": lambda: gpu_training.process_group(runs),
        "logprob_128k": lambda: gpu_rates.logprob_128k(profile, device),
        "throughput": lambda: gpu_rates.throughput(profile, device),
        "generation": lambda: gpu_rates.generation(profile, device, work),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: the dry run never touches a GPU
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA GPU visible; use --device cpu for the dry run"}))
        return 2
    if args.device == "cuda":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the ranks inherit it
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    profile = PROFILES[args.device]
    skip = {s for s in args.skip.split(",") if s}
    started = time.perf_counter()
    report: dict[str, Any] = {**_environment(device), "profile": profile}
    with tempfile.TemporaryDirectory(prefix="prefflow-gpu-check-") as tmp:
        for name, fn in _sections(profile, device, Path(tmp)).items():
            if name not in skip:
                report[name] = _timed(name, fn)
                _conclude(report, started, args.out)  # what is done so far survives a kill
    text = _conclude(report, started, args.out)
    print(text)
    return 0 if report["ok"] else 1


def _conclude(report: dict[str, Any], started: float, out: str | None) -> str:
    """Total time, ``ok`` and the failed sections; the JSON text, also written (atomically) to ``out``."""
    from steps.io import atomic_write_text

    failed = [n for n in SECTIONS if n in report and not (report[n]["ok"] and report[n].get("passed", True))]
    report.update(seconds=round(time.perf_counter() - started, 1), ok=not failed, failed=failed)
    text = json.dumps(report, default=str)
    if out:
        atomic_write_text(out, text + "\n")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
