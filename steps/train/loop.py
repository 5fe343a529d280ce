"""The one training loop shared by SFT and preference optimisation.

An ``Objective`` says how to batch the data and score a micro-batch; this loop does the rest:
gradient accumulation (normalised over the whole optimizer step, so 2 x B/2 == 1 x B), AdamW,
warmup + cosine/linear/constant schedules, grad-norm clipping, bf16 autocast on GPU, progress,
a JSONL metrics log, dev evaluation per epoch, checkpoints with resume, and a hard stop on a
non-finite loss that keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from steps.config import TrainConfig
from steps.train import checkpoints, parallel
from steps.train.batching import TokenBatch
from steps.train.schedule import lr_lambda

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN/inf."""


class Objective(Protocol):
    name: str

    def epoch_batch_count(self, epoch: int) -> int: ...

    def epoch_batches(self, epoch: int) -> list[TokenBatch]: ...

    def step_denominator(self, micro_batches: list[TokenBatch]) -> float: ...

    def micro_step(self, model, batch: TokenBatch, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Scaled loss to backpropagate and metric sums (already weighted by this micro-batch's share)."""

    def evaluate(self, model) -> dict[str, float]: ...


@dataclass
class TrainResult:
    final_step: int
    history: list[dict]
    dev_history: list[dict]
    checkpoint_dir: Path | None
    elapsed_s: float
    tokens_per_s: float
    resumed_from: str | None = None
    extra: dict = field(default_factory=dict)
    model: object = None  # what was trained: the model passed in, or its FSDP2 root (parallelism: fsdp)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if any(p.is_cuda for p in decay) else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, **kwargs)


def autocast_for(model):
    device = next(model.parameters()).device
    if device.type == "cuda" and next(model.parameters()).dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def group_steps(micro_batches: list, grad_accum: int) -> list[list]:
    return [micro_batches[i : i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) unless torch.distributed is initialised (torchrun / @parallel)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_grads(model) -> None:
    """Sum replicated gradients over ranks (ddp): every rank then takes the identical optimizer step."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def _all_reduce_totals(totals: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(totals)
    vec = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))


def optimizer_step(
    model, optimizer, objective: Objective, micro_batches: list[TokenBatch], max_grad_norm: float | None, step: int
) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (gradient accumulation). Raises on non-finite loss.

    Under torch.distributed the micro-batches are dealt round-robin to the ranks and the loss is
    normalised by the whole step's denominator, so N ranks give the same update as one process.
    A sharded model needs the same number of forward/backward passes on every rank (each one runs
    collectives): a rank that is dealt fewer micro-batches runs its first one again with zero weight.
    """
    device = next(model.parameters()).device
    rank, world_size = world()
    denominator = objective.step_denominator(micro_batches)
    mine = [(mb, 1.0) for mb in micro_batches[rank::world_size]]
    if parallel.is_sharded(model):
        rounds = math.ceil(len(micro_batches) / world_size)
        mine += [(micro_batches[0], 0.0)] * (rounds - len(mine))
    totals: dict[str, float] = {"tokens": 0.0}
    for i, (mb, weight) in enumerate(mine):
        mb = mb.to(device)
        parallel.set_gradient_sync(model, i == len(mine) - 1)
        with autocast_for(model):
            loss, metrics = objective.micro_step(model, mb, denominator)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"non-finite loss ({loss.item()}) at optimizer step {step + 1}, micro-batch {i}"
            )
        (loss * weight if weight != 1.0 else loss).backward()
        if weight == 0.0:
            continue
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        totals["tokens"] += mb.num_tokens
    if world_size > 1:
        if not parallel.is_sharded(model):  # FSDP2 reduced the gradients in the last backward
            _all_reduce_grads(model)
        totals = _all_reduce_totals(totals)
    params = [p for p in model.parameters() if p.grad is not None]
    # with max_norm=inf this only measures the norm (DTensor-aware under FSDP2)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        raise TrainingDivergedError(f"non-finite gradient norm at optimizer step {step + 1}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals["grad_norm"] = float(grad_norm)
    return totals


def train(
    model,
    tokenizer,
    objective: Objective,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = True,
    stop_after_steps: int | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place. Checkpoints go to ``out_dir/checkpoints``, metrics to ``out_dir/metrics.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    seed_everything(cfg.seed)
    rank, world_size = world()
    if cfg.parallelism == "fsdp" and world_size > 1:
        model = parallel.shard(model, world_size)
    model.train()

    total_steps = sum(math.ceil(objective.epoch_batch_count(e) / cfg.grad_accum) for e in range(cfg.epochs))
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps == 0:
        raise ValueError(f"{desc}: no training batches (check the data and max_seq_len/overlength)")
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    step, start_epoch, start_group = 0, 0, 0
    history: list[dict] = []
    dev_history: list[dict] = []
    resumed_from = None
    latest = checkpoints.latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        progress = checkpoints.load_checkpoint(latest, model, optimizer, scheduler)
        step, start_epoch, start_group = progress["step"], progress["epoch"], progress["group"]
        history, dev_history = progress.get("history", []), progress.get("dev_history", [])
        resumed_from = str(latest)
    is_main = rank == 0
    if is_main:
        _rewrite_metrics(metrics_path, history + [{"split": "dev", **d} for d in dev_history])
    last_good = latest

    t0 = time.perf_counter()
    trained_tokens = 0
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True, disable=not is_main)
    done = step >= total_steps
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        batches = objective.epoch_batches(epoch)
        groups = group_steps(batches, cfg.grad_accum)
        first = start_group if epoch == start_epoch else 0
        for g in range(first, len(groups)):
            step_t0 = time.perf_counter()
            try:
                totals = optimizer_step(model, optimizer, objective, groups[g], cfg.max_grad_norm, step)
            except TrainingDivergedError as exc:
                bar.close()
                raise TrainingDivergedError(
                    f"{desc}: {exc} (epoch {epoch}); last good checkpoint: "
                    f"{last_good or 'none'}; try a lower lr or check the data"
                ) from exc
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            dt = time.perf_counter() - step_t0
            trained_tokens += int(totals["tokens"])
            record = {
                "step": step,
                "epoch": epoch,
                "lr": lr,
                "step_time_s": round(dt, 4),
                "tokens_per_s": totals["tokens"] / dt,
                **totals,
            }
            history.append(record)
            if is_main:
                _append_metrics(metrics_path, record)
            bar.set_postfix(
                loss=f"{totals.get('loss', float('nan')):.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            bar.update(1)
            end_of_epoch = g == len(groups) - 1
            done = step >= total_steps
            progress = {
                "step": step,
                "epoch": epoch + 1 if end_of_epoch else epoch,
                "group": 0 if end_of_epoch else g + 1,
            }
            if end_of_epoch and cfg.dev_every_epoch:
                dev = {"step": step, "epoch": epoch, **objective.evaluate(model)}
                dev_history.append(dev)
                if is_main:
                    _append_metrics(metrics_path, {"split": "dev", **dev})
                log.info("%s dev after epoch %d: %s", desc, epoch, _fmt(dev))
                model.train()
            periodic = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
            if end_of_epoch or periodic or done:
                last_good = _checkpoint(
                    is_main,
                    ckpt_root,
                    step,
                    model,
                    tokenizer,
                    optimizer,
                    scheduler,
                    {**progress, "history": history, "dev_history": dev_history},
                    cfg.keep_checkpoints,
                )
            if stop_after_steps is not None and step >= stop_after_steps:
                bar.close()
                raise KeyboardInterrupt(f"{desc}: stopped after step {step} (stop_after_steps)")
            if done:
                break
    bar.close()
    if not dev_history or dev_history[-1]["step"] != step:
        dev = {"step": step, "epoch": cfg.epochs - 1, **objective.evaluate(model)}
        dev_history.append(dev)
        if is_main:
            _append_metrics(metrics_path, {"split": "dev", **dev})
    elapsed = time.perf_counter() - t0
    log.info(
        "%s finished: %d steps in %.1fs (%.0f tokens/s); wrote %s",
        desc,
        step,
        elapsed,
        trained_tokens / max(elapsed, 1e-9),
        out_dir,
    )
    return TrainResult(
        step, history, dev_history, last_good, elapsed, trained_tokens / max(elapsed, 1e-9), resumed_from, model=model
    )


def _checkpoint(
    is_main: bool, ckpt_root: Path, step: int, model, tokenizer, optimizer, scheduler, progress: dict, keep: int
) -> Path:
    """Rank 0 writes (after every rank helped gather a sharded model); the others wait, so all resume alike."""
    path = ckpt_root / f"step_{step:07d}"
    weights = parallel.full_state_dict(model)
    optimizer_state = parallel.full_optimizer_state(model, optimizer)
    if is_main:
        path = checkpoints.save_checkpoint(
            ckpt_root,
            step,
            parallel.unwrap(model),
            tokenizer,
            optimizer,
            scheduler,
            progress,
            keep=keep,
            weights=weights,
            optimizer_state=optimizer_state,
        )
    _, world_size = world()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return path


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _rewrite_metrics(path: Path, history: list[dict]) -> None:
    """After a resume the log holds exactly the steps the checkpoint knows about (no duplicates)."""
    from steps.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))
