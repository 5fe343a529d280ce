"""PrefFlow's side: the pipeline's own training engine (steps.train: loop, objectives, LoRA) and generation.

The one benchmark-specific setting: every step takes exactly ``batch_size`` examples (length-bucketed), like TRL.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import flops, hardware, synthetic
from benchmarks.spec import (
    LORA,
    LORA_TASKS,
    LOSS_PARAMS,
    MODELS,
    PREFERENCE_TASKS,
    OptimSettings,
    SideResult,
    WorkerSpec,
    lora_settings,
    loss_name,
)

if TYPE_CHECKING:
    from steps.train.batching import TokenBatch

logger = logging.getLogger(__name__)


def batch_lengths(batch: TokenBatch) -> list[int]:
    """Real tokens of each logical row of a collated batch (a shared-prompt row is two sequences)."""
    if "pair_lengths" in batch.extra:
        return [n for p, c, r in batch.extra["pair_lengths"].tolist() for n in (p + c, p + r)]
    return [int(n) for n in batch.attention_mask.sum(dim=1).tolist()]


def run_training(spec: WorkerSpec) -> SideResult:
    """Train ``spec.steps + spec.warmup_steps`` steps through ``steps.train.loop.train``; report the measured ones."""
    import torch

    from steps.config import LoraConfig, PreferenceConfig, SFTConfig
    from steps.losses import build_loss, requires_reference
    from steps.train.batching import tokenize_pairs, tokenize_sft
    from steps.train.loop import train
    from steps.train.objectives import PreferenceObjective, SFTObjective, precompute_reference
    from steps.train.recipes import apply_lora

    opt = OptimSettings()
    device, tokenizer, model, load_s, total_steps, n_examples = hardware.load_side(spec)
    base_shape = flops.model_shape(model)

    common: dict[str, Any] = dict(
        betas=opt.betas,
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm,
        max_num_tokens=spec.batch_size * 2 * spec.max_len,
        max_seq_len=spec.max_len,
        overlength="drop",
        epochs=1,
        max_steps=total_steps,
        seed=opt.seed,
        schedule="cosine",
        warmup_steps=0,
        dev_every_epoch=False,
        keep_checkpoints=1,
        max_batch_examples=spec.batch_size,
    )
    t0 = time.perf_counter()
    precompute_s, needs_reference = None, False
    cfg: PreferenceConfig | SFTConfig
    objective: PreferenceObjective | SFTObjective
    if spec.task in PREFERENCE_TASKS:
        cfg = PreferenceConfig(lr=opt.lr, **common, lora=LORA if spec.task in LORA_TASKS else LoraConfig())
        rows = synthetic.preference_rows(tokenizer, n_examples, spec.max_len, spec.data_seed)
        examples, stats = tokenize_pairs(rows, tokenizer, spec.max_len, "drop")
        loss_fn = build_loss(loss_name(spec.task), **LOSS_PARAMS[loss_name(spec.task)])
        needs_reference = requires_reference(loss_name(spec.task))
        setup_s = time.perf_counter() - t0
        if needs_reference:
            # the policy before its first update is the reference, exactly as run_preference does it
            hardware.synchronize(device)
            t0 = time.perf_counter()
            precompute_reference(model, examples, tokenizer.pad_token_id, cfg)
            hardware.synchronize(device)
            precompute_s = time.perf_counter() - t0
        model = apply_lora(model, cfg)  # after the reference pass, as run_preference does it
        objective = PreferenceObjective(examples, [], tokenizer.pad_token_id, cfg, loss_fn, needs_reference)
    else:
        cfg = SFTConfig(lr=opt.sft_lr, **common)
        rows = synthetic.sft_rows(tokenizer, n_examples, spec.max_len, spec.data_seed)
        sft_examples, stats = tokenize_sft(rows, tokenizer, spec.max_len, "drop")
        objective = SFTObjective(sft_examples, [], tokenizer.pad_token_id, cfg)
        setup_s = time.perf_counter() - t0
    if stats.dropped_overlength or stats.truncated:
        raise RuntimeError(f"synthetic data did not fit max_len {spec.max_len}: {stats.as_dict()}")

    t0 = time.perf_counter()
    batches = objective.epoch_batches(
        0
    )  # collation of the whole epoch, timed apart (the loop collates each step's share lazily)
    collate_s = time.perf_counter() - t0
    torch.manual_seed(opt.seed)
    with tempfile.TemporaryDirectory(prefix="prefflow-bench-") as out_dir:
        result = train(model, objective, cfg, Path(out_dir), resume=False, desc=f"bench-{spec.task}")
    history = result.history
    if len(history) != total_steps:
        raise RuntimeError(f"expected {total_steps} steps, the loop ran {len(history)}")
    measured = history[spec.warmup_steps :]
    # grad_accum is 1: step k trained the epoch's k-th cached batch; the token counts must agree
    step_lengths = [batch_lengths(b) for b in batches[:total_steps]]
    if [sum(x) for x in step_lengths] != [int(h["tokens"]) for h in history]:
        raise RuntimeError("the loop's per-step tokens do not match its cached batches: cannot count FLOPs")
    counted = flops.step_flops(
        flops.model_shape(model), base_shape if needs_reference else None, step_lengths[spec.warmup_steps :]
    )
    params = sum(p.numel() for p in model.parameters())
    settings: dict[str, Any] = {
        "batching": f"length-bucketed, {spec.batch_size} examples/step",
        "reference": "precomputed" if precompute_s is not None else "none",
        "collate_s": round(collate_s, 3),
        "dtype": "fp32" + (" + bf16 autocast" if device.type == "cuda" else ""),
    }
    if spec.task in LORA_TASKS:
        settings["lora"] = lora_settings("preference.lora (peft)")
    settings["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return SideResult(
        side="prefflow",
        task=spec.task,
        model=spec.model,
        implementation="prefflow steps.train",
        device=hardware.device_name(device),
        threads=torch.get_num_threads(),
        params=params,
        settings=settings,
        step_times_s=[h["step_time_s"] for h in measured],
        step_tokens=[int(h["tokens"]) for h in measured],
        warmup_tokens=sum(int(h["tokens"]) for h in history[: spec.warmup_steps]),
        precompute_s=precompute_s,
        load_s=load_s,
        setup_s=setup_s,
        first_loss=history[0].get("loss"),
        peak_rss_mb=hardware.vm_hwm_mb(),
        cuda_peak_mb=hardware.cuda_peak_mb(device),
        train_flops=counted["train_flops"],
        reference_flops=counted["reference_flops"],
        flops_detail={k: counted[k] for k in ("policy_shape", "reference_shape")},
        gemm_shapes=flops.gemm_shapes(model),
    )


def run_generation(spec: WorkerSpec, batch_size: int, side: str) -> SideResult:
    """Greedy generation of ``spec.gen_prompts`` instructions with ``batch_size`` prompts per batch."""
    import torch

    from steps.evaluate.generation import generate_outputs
    from steps.evaluate.settings import GenerationSettings

    device = hardware.pick_device()
    from steps.models import load_model, load_tokenizer

    model_spec = MODELS[spec.model]
    tokenizer = load_tokenizer(model_spec)
    t0 = time.perf_counter()
    model = load_model(
        model_spec,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        device=str(device),
        attn_implementation="sdpa",
    )
    load_s = time.perf_counter() - t0
    texts = synthetic.instructions(spec.gen_prompts)
    generation = GenerationSettings(max_new_tokens=spec.gen_max_new_tokens, temperature=0.0, batch_size=batch_size)
    settings = {**generation.record(), "backend": "hf"}
    warmup = GenerationSettings(max_new_tokens=2, temperature=0.0, batch_size=1)
    generate_outputs(
        model, tokenizer, texts[:1], generator="warmup", generation=warmup, backend="hf", show_progress=False
    )
    hardware.synchronize(device)
    t0 = time.perf_counter()
    records = generate_outputs(
        model, tokenizer, texts, generator="bench", generation=generation, backend="hf", show_progress=False
    )
    hardware.synchronize(device)
    generate_s = time.perf_counter() - t0
    outputs = [r["output"] for r in records]
    # generated tokens = output tokens + the end-of-turn token for outputs that stopped before the limit
    generated = 0
    for text in outputs:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        generated += min(n + 1, spec.gen_max_new_tokens)
    return SideResult(
        side=side,
        task="generate",
        model=spec.model,
        implementation=f"prefflow generate_outputs(batch_size={batch_size})",
        device=hardware.device_name(device),
        threads=torch.get_num_threads(),
        params=sum(p.numel() for p in model.parameters()),
        settings=settings,
        load_s=load_s,
        prompts=len(texts),
        generated_tokens=generated,
        generate_s=generate_s,
        outputs=outputs,
        peak_rss_mb=hardware.vm_hwm_mb(),
        cuda_peak_mb=hardware.cuda_peak_mb(device),
    )
