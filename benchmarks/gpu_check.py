"""``make gpu-check``, on one CUDA GPU in minutes, one JSON object: mixed-precision DPO against fp32, a 1-rank NCCL
group through torchrun and the real training path, the bench's SFT and DPO rows on a ~1B Llama (tokens/s, MFU)
and generation tokens/s. ``--device cpu`` is the dry run the test suite runs."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.gpu_check")

#: |DPO loss with bf16 compute - with fp32 compute| allowed at every step (lr 1e-8, fp32 master weights both).
#: bf16 compute has a noise floor: on CPU the 135M default's margin for the same pair moved by up to 0.72 nats
#: between a batch of 4 and the pair alone (fp32: 0.0002), i.e. 0.07 on the beta-0.1 DPO logit, and the losses of
#: 3 steps differed from fp32 by up to 0.052. The bound is that floor's order; weights_moved and
#: first_step_is_log2 are the sharp checks (bf16 weights move ~0.02 %; a reference in another dtype is not log 2).
LOSS_TOLERANCE = 0.1
MIN_MOVED = 0.5  # fraction of weight entries DPO at lr 1e-8 must change (bf16 weights: ~0.02 %)

# what each device runs: the real sizes on a GPU, the tiny model on CPU (same code, seconds)
PROFILES: dict[str, dict[str, Any]] = {
    "cuda": {
        "dpo_model": "default",
        "bench_model": "1b",
        "gen_model": "default",
        "max_len": 512,
        "dpo_steps": 4,
        "bench_steps": 8,
        "gen_prompts": 32,
        "gen_tokens": 128,
    },
    "cpu": {
        "dpo_model": "tiny",
        "bench_model": "tiny",
        "gen_model": "tiny",
        "max_len": 128,
        "dpo_steps": 3,
        "bench_steps": 2,
        "gen_prompts": 4,
        "gen_tokens": 8,
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the dry run (tiny models)")
    ap.add_argument("--out", help="also write the JSON object here")
    ap.add_argument(
        "--skip", default="", help="comma-separated sections to skip: mixed_precision,process_group,bench,generation"
    )
    return ap.parse_args(argv)


def _timed(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section; a failure is recorded (with its traceback tail) and the others still run."""
    t0 = time.perf_counter()
    try:
        result = {"ok": True, **fn()}
    except Exception as exc:  # one broken section must not hide the others' numbers
        logger.exception("%s failed", name)
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    _free()
    return result


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pairs(tokenizer: Any, n: int, max_len: int, seed: int) -> list:
    from benchmarks import synthetic
    from steps.train.batching import tokenize_pairs

    pairs, stats = tokenize_pairs(synthetic.preference_rows(tokenizer, n, max_len, seed), tokenizer, max_len)
    if stats.dropped_overlength:
        raise RuntimeError(f"synthetic pairs did not fit {max_len} tokens: {stats.as_dict()}")
    return pairs


def bf16_tie_fraction(model: Any) -> float:
    """Share of weight entries exactly halfway between two bf16 values (low 16 bits of the fp32 pattern 0x8000):
    a tiny fp32 update flips their bf16 rounding, so bf16 compute jumps by a bf16 step (dequantised GGUF ~8 %)."""
    import torch

    ties = total = 0
    for p in model.parameters():
        bits = p.detach().float().contiguous().view(torch.int32) & 0xFFFF
        ties += int((bits == 0x8000).sum())
        total += p.numel()
    return ties / total


def mixed_precision(profile: dict[str, Any], device: Any, work: Path) -> dict[str, Any]:
    """DPO at lr 1e-8 from the same weights, bf16 compute vs fp32 compute (fp32 master weights both): the bf16 run
    must move the weights, start at exactly log 2 (policy and reference in one dtype) and track the fp32 losses."""
    from benchmarks.spec import MODELS
    from steps.config import PreferenceConfig
    from steps.losses import build_loss
    from steps.models import load_model, load_tokenizer
    from steps.models.load import resolve_dtype
    from steps.train import parallel
    from steps.train.loop import train
    from steps.train.objectives import PreferenceObjective, precompute_reference
    from steps.train.precision import resolve_precision

    spec, batch, max_len, steps = MODELS[profile["dpo_model"]], 4, profile["max_len"], profile["dpo_steps"]
    tokenizer = load_tokenizer(spec)
    cfg = PreferenceConfig(
        lr=1e-8, final_lr=5e-9, max_num_tokens=batch * 2 * max_len, max_seq_len=max_len, max_batch_examples=batch,
        max_steps=steps, dev_every_epoch=False, seed=1814,
    )  # fmt: skip
    runs: dict[str, Any] = {}
    ties = None
    for compute in ("float32", "bfloat16"):
        precision = resolve_precision(compute, "float32", device)
        model = load_model(spec, dtype="float32", device=str(device), attn_implementation="sdpa")
        ties = bf16_tie_fraction(model) if ties is None else ties
        before = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        pairs = _pairs(tokenizer, batch * steps, max_len, seed=0)
        precompute_reference(model, pairs, tokenizer.pad_token_id, cfg, precision=precision)
        objective = PreferenceObjective(pairs, [], tokenizer.pad_token_id, cfg, build_loss("dpo", beta=0.1), True)
        result = train(model, tokenizer, objective, cfg, work / f"dpo-{compute}", resume=False, precision=precision)
        after = parallel.unwrap(result.model).state_dict()
        changed = sum(int((before[k] != after[k].detach().cpu()).sum()) for k in before)
        runs[compute] = {
            "precision": result.extra["precision"],
            "losses": [h["loss"] for h in result.history],
            "moved_fraction": changed / sum(v.numel() for v in before.values()),
            "tokens_per_s": result.tokens_per_s,
        }
        del model, before, after, result
        _free()
    bf16 = runs["bfloat16"]
    diff = max(abs(a - b) for a, b in zip(bf16["losses"], runs["float32"]["losses"]))
    auto = resolve_dtype("auto", device)  # model.dtype / evaluation.dtype auto: bf16 on a GPU, fp32 on CPU
    checks = {
        "auto_dtype_ok": auto == ("bfloat16" if device.type == "cuda" else "float32"),
        "weights_moved": bf16["moved_fraction"] >= MIN_MOVED,
        "first_step_is_log2": abs(bf16["losses"][0] - math.log(2)) <= 1e-6,
        "losses_match": diff <= LOSS_TOLERANCE,
    }
    return {
        "model": spec,
        "steps": steps,
        "bf16_tie_fraction": ties,
        "auto_dtype": auto,
        "runs": runs,
        "max_abs_loss_diff": diff,
        "loss_tolerance": LOSS_TOLERANCE,
        **checks,
        "passed": all(checks.values()),
    }


def process_group(profile: dict[str, Any], work: Path) -> dict[str, Any]:
    """torchrun with one rank (NCCL on a GPU): DDP trains step 1 and writes a DCP checkpoint; FSDP2 resumes from
    it (resharding) and trains step 2, with dev evaluation, exports and every collective on the real path."""
    from benchmarks import synthetic
    from steps.config import config_from_dict, for_loss
    from steps.io import write_jsonl
    from steps.models import load_tokenizer
    from steps.train.launch import launch_torchrun

    tokenizer = load_tokenizer("tiny")
    data = work / "pg-data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "preference.train.jsonl", synthetic.preference_rows(tokenizer, 16, 128, seed=1))
    write_jsonl(data / "preference.dev.jsonl", synthetic.preference_rows(tokenizer, 6, 128, seed=2))
    out = work / "pg-run"
    summaries = {}
    for parallelism, max_steps in (("ddp", 1), ("fsdp", 2)):
        raw = {
            "name": "gpu_check",
            "model": {"base": "tiny", "dtype": "bfloat16"},  # compute; fp32 master weights
            "preference": {
                "criterion": "dpo", "lr": 1e-4, "max_num_tokens": 1024, "max_seq_len": 128, "grad_accum": 2,
                "max_steps": max_steps, "checkpoint_every_steps": 1, "parallelism": parallelism,
            },
            "resources": {"process_group_timeout_s": 300},
        }  # fmt: skip
        cfg = for_loss(config_from_dict(raw, "gpu_check"), "dpo")
        summary = launch_torchrun(cfg, "dpo", str(data), str(out), None, nproc_per_node=1)
        if summary is None:  # launch_torchrun returns rank 0's summary only where rank 0 ran (always, on one node)
            raise RuntimeError("launch_torchrun returned no summary from rank 0")
        summaries[parallelism] = {
            k: summary.get(k) for k in ("steps", "resumed_from", "precision", "world_size", "final_train", "final_dev")
        }
    fsdp = summaries["fsdp"]
    resumed = bool(fsdp["resumed_from"]) and str(fsdp["resumed_from"]).endswith("step_0000001")
    return {"backend": _backend(), "runs": summaries, "passed": fsdp["steps"] == 2 and resumed}


def _backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def bench(profile: dict[str, Any]) -> dict[str, Any]:
    """The bench's SFT and DPO rows (benchmarks.prefflow_side: the real loop, length-bucketed batches of 4)."""
    import torch

    from benchmarks import flops
    from benchmarks.prefflow_side import run_training
    from benchmarks.spec import MODELS, WorkerSpec

    rows = {}
    for task in ("sft", "dpo"):
        spec = WorkerSpec(
            side="prefflow", task=task, model=profile["bench_model"], steps=profile["bench_steps"], warmup_steps=2,
            batch_size=4, max_len=profile["max_len"], threads=torch.get_num_threads(), out="",
        )  # fmt: skip
        result = run_training(spec)
        peak = flops.peak_bf16_flops(result.device) if result.device and not result.device.startswith("CPU") else None
        rows[task] = {
            "model": MODELS[profile["bench_model"]][:60],
            "params": result.params,
            "device": result.device,
            "dtype": result.settings.get("dtype"),
            "tokens_per_s": result.tokens_per_s,
            "train_tokens_per_s": result.train_tokens_per_s,
            "model_tflops_per_s": (result.flops_per_s or 0) / 1e12,
            "mfu": flops.mfu(result.flops_per_s, peak),
            "peak_tflops": peak / 1e12 if peak else None,
            "cuda_peak_mb": result.cuda_peak_mb,
            "first_loss": result.first_loss,
        }
        _free()
    return {"rows": rows}


def generation(profile: dict[str, Any], device: Any) -> dict[str, Any]:
    """Generated tokens/s: HF continuous batching (16 slots), and vLLM (bf16) when it is installed."""
    import importlib.util

    import torch

    from benchmarks.prefflow_side import run_generation
    from benchmarks.spec import MODELS, WorkerSpec

    spec = WorkerSpec(
        side="prefflow", task="generate", model=profile["gen_model"], steps=1, warmup_steps=0, batch_size=1,
        max_len=profile["max_len"], threads=torch.get_num_threads(), out="", gen_prompts=profile["gen_prompts"],
        gen_max_new_tokens=profile["gen_tokens"], gen_batch_size=16,
    )  # fmt: skip
    hf = run_generation(spec, 16, "prefflow")
    out: dict[str, Any] = {
        "model": MODELS[profile["gen_model"]],
        "hf": {"tokens_per_s": hf.tokens_per_s, "prompts": hf.prompts, "generated_tokens": hf.generated_tokens},
    }
    if importlib.util.find_spec("vllm") is None or device.type != "cuda":
        out["vllm"] = {"skipped": "vllm not installed" if device.type == "cuda" else "needs a CUDA GPU"}
        return out
    out["vllm"] = _vllm_tokens_per_s(MODELS[profile["gen_model"]], profile)
    return out


def _vllm_tokens_per_s(spec: str, profile: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from benchmarks import synthetic
    from steps.chat import stop_token_ids
    from steps.evaluate.generation import encode_instruction
    from steps.models import ensure_embedded_model, load_tokenizer, resolve_model_spec

    source = resolve_model_spec(spec)
    path = str(ensure_embedded_model(source.location)) if source.kind == "embedded" else source.location
    tokenizer = load_tokenizer(spec)
    prompts = [{"prompt_token_ids": encode_instruction(tokenizer, t)} for t in synthetic.instructions(16)]
    prompts = (prompts * (1 + profile["gen_prompts"] // len(prompts)))[: profile["gen_prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=profile["gen_tokens"], stop_token_ids=stop_token_ids(tokenizer))
    t0 = time.perf_counter()
    llm = LLM(model=path, tokenizer=path, dtype="bfloat16", seed=1814, gpu_memory_utilization=0.5)
    start_s = time.perf_counter() - t0
    llm.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    results = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    del llm
    return {"tokens_per_s": generated / seconds, "generated_tokens": generated, "engine_start_s": start_s}


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
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    profile = PROFILES[args.device]
    skip = {s for s in args.skip.split(",") if s}
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "profile": profile,
    }
    with tempfile.TemporaryDirectory(prefix="prefflow-gpu-check-") as tmp:
        work = Path(tmp)
        sections: dict[str, Callable[[], dict[str, Any]]] = {
            "mixed_precision": lambda: mixed_precision(profile, device, work),
            "process_group": lambda: process_group(profile, work),
            "bench": lambda: bench(profile),
            "generation": lambda: generation(profile, device),
        }
        for name, fn in sections.items():
            if name not in skip:
                report[name] = _timed(name, fn)
    report["seconds"] = round(time.perf_counter() - started, 1)
    failed = [n for n in sections if n in report and not (report[n]["ok"] and report[n].get("passed", True))]
    report["ok"] = not failed
    report["failed"] = failed
    text = json.dumps(report, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
