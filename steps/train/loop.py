"""The one training loop shared by SFT and preference optimisation: per-rank gradient accumulation under DDP or
FSDP2, mixed precision, AdamW with warmup and decay, clipping, metrics, dev evaluation, sharded checkpoints with
resume, and a stop on every rank together when any rank sees a non-finite loss."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from steps.config import TrainConfig
from steps.tracking import Tracker
from steps.train import checkpoints, collectives, parallel
from steps.train.batching import TokenBatch
from steps.train.dealing import plan_epoch, rank_share
from steps.train.precision import Precision, default_precision, enable_tf32
from steps.train.prefetch import StepPrefetcher
from steps.train.schedule import lr_lambda

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN/inf (raised on every rank at the same optimizer step)."""


class Objective(Protocol):
    name: str

    def epoch_batch_count(self, epoch: int) -> int: ...

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Example indices of each micro-batch of ``epoch``: the same on every rank, nothing collated."""

    def collate_train(self, indices: list[int]) -> TokenBatch: ...

    def step_denominator(self, micro_batches: list[TokenBatch]) -> float:
        """This rank's share of the step's loss denominator (the loop sums it over ranks)."""

    def micro_step(
        self, model: Any, batch: TokenBatch, denominator: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Scaled loss to backpropagate and metric sums (already weighted by this micro-batch's share), as 0-d
        tensors on the device: the loop reads them once per step."""

    def before_training(self, model: Any, precision: Precision) -> None:
        """Once the model is wrapped, before step 1 and before a checkpoint is restored (reference scoring)."""

    def evaluate(self, model: Any) -> dict[str, float]: ...


@dataclass
class LoopResult:
    """What :func:`train` returns: the trained root module and the run's records (the recipes turn it into the
    step's :class:`steps.results.TrainResult`)."""

    final_step: int
    history: list[dict]
    dev_history: list[dict]
    checkpoint_dir: Path | None
    elapsed_s: float
    tokens_per_s: float
    resumed_from: str | None = None
    extra: dict = field(default_factory=dict)
    model: Any = None  # what was trained: the root module (bare, DDP or FSDP2); parallel.unwrap gives the HF model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the master weights; no weight decay on biases and norm weights (1-D parameters)."""
    from torch.distributed.tensor import DTensor

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused kernels for plain CUDA tensors; FSDP2's DTensors take the (default) foreach implementation
    fused = bool(decay) and all(p.is_cuda and not isinstance(p, DTensor) for p in decay)
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=1e-8, **kwargs)


def optimizer_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    micro_batches: list[TokenBatch],
    max_grad_norm: float | None,
    step: int,
    precision: Precision | None = None,
) -> dict[str, float]:
    """One optimizer step over this rank's ``micro_batches`` (at least one, on the host; gradient accumulation).

    Each micro-batch loss is divided by the step's global denominator (one tiny all-reduce first) and gradients
    are summed over ranks, so W ranks x A micro-batches give the update of 1 process x W*A. Metrics and non-finite
    flags stay on the device until the step's one metrics all-reduce and read: a non-finite loss on any rank makes
    every rank raise TrainingDivergedError together.
    """
    if not micro_batches:
        raise ValueError("optimizer_step needs at least one micro-batch on every rank")
    device = parallel.device_of(model)
    world_size = collectives.world()[1]
    precision = precision or default_precision(model)
    tokens = float(sum(mb.num_tokens for mb in micro_batches))  # counted on the host copies: no device read
    head = torch.tensor([objective.step_denominator(micro_batches), tokens], dtype=torch.float64, device=device)
    collectives.all_reduce_sum(head, device, "step denominator")
    denominator, all_tokens = head.tolist()
    sums: dict[str, torch.Tensor] = {}
    nonfinite = torch.zeros(len(micro_batches), dtype=torch.float64, device=device)
    for i, host_batch in enumerate(micro_batches):
        mb = host_batch.to(device, non_blocking=device.type == "cuda")
        with parallel.gradient_sync(model, i == len(micro_batches) - 1):
            with parallel.compute_context(model, precision):
                loss, metrics = objective.micro_step(model, mb, denominator)
            nonfinite[i] = (~torch.isfinite(loss.detach())).to(torch.float64)
            loss.backward()  # even when non-finite: the other ranks are in this backward's reduction
        for k, v in metrics.items():
            value = torch.as_tensor(v, device=device).detach().to(torch.float64)
            sums[k] = sums[k] + value if k in sums else value
    totals = _reduce_step_metrics(sums, nonfinite, device)
    bad_ranks = [r for r in range(world_size) if totals.pop(f"nonfinite@{r}") > 0]
    first_bad = int(totals.pop("first_nonfinite_here"))
    totals["tokens"] = all_tokens
    if bad_ranks:
        optimizer.zero_grad(set_to_none=True)
        where = f", micro-batch {first_bad} here" if first_bad < len(micro_batches) else ""
        raise TrainingDivergedError(
            f"non-finite loss at optimizer step {step + 1} on rank(s) {bad_ranks} of {world_size}{where}"
        )
    params = [p for p in model.parameters() if p.grad is not None]
    # with max_norm=inf this only measures the norm (DTensor-aware under FSDP2: the same on every rank)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    norm = float(grad_norm)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(f"non-finite gradient norm at optimizer step {step + 1}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals["grad_norm"] = norm
    return totals


def _reduce_step_metrics(sums: dict[str, torch.Tensor], nonfinite: torch.Tensor, device: torch.device) -> dict:
    """Sum the step's metrics and every rank's non-finite count over the ranks (one all-reduce) and read them, with
    this rank's first non-finite micro-batch, in one transfer. Keys ``nonfinite@<rank>``, ``first_nonfinite_here``
    (the micro-batch count when there is none) come back beside the metrics."""
    rank, world_size = collectives.world()
    keys = sorted(sums)
    flags = torch.zeros(world_size, dtype=torch.float64, device=device)
    flags[rank] = nonfinite.sum()
    vector = torch.cat([torch.stack([sums[k] for k in keys]), flags]) if keys else flags
    collectives.all_reduce_sum(vector, device, "step metrics")
    order = torch.arange(len(nonfinite), dtype=torch.float64, device=device)
    first = torch.where(nonfinite > 0, order, torch.full_like(order, float(len(nonfinite)))).min()
    values = torch.cat([vector, first.view(1)]).tolist()
    names = keys + [f"nonfinite@{r}" for r in range(world_size)] + ["first_nonfinite_here"]
    return dict(zip(names, values))


def plan_total_steps(objective: Objective, cfg: TrainConfig, world_size: int, lockstep: bool) -> int:
    """Optimizer steps of the whole run (what the schedule decays over) under this world size."""
    total = 0
    for epoch in range(cfg.epochs):  # stop planning once max_steps is reached (imported recipes: epochs = max_steps)
        total += len(plan_epoch(objective.epoch_batch_count(epoch), world_size, cfg.grad_accum, lockstep).steps)
        if cfg.max_steps is not None and total >= cfg.max_steps:
            return cfg.max_steps
    return total


def train(
    model: Any,
    objective: Objective,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = True,
    desc: str = "train",
    precision: Precision | None = None,
    tracker: Tracker | None = None,
) -> LoopResult:
    """Train ``model`` (a Hugging Face causal LM) in place on every rank; ``result.model`` is the trained root.

    Under torch.distributed the model is wrapped in DDP or FSDP2 (``cfg.parallelism``) even for one rank; each
    rank collates only its own micro-batches, one step at a time. Checkpoints go to ``out_dir/checkpoints``,
    metrics to ``out_dir/metrics.jsonl`` (rank 0). ``precision``: None = :func:`default_precision`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    seed_everything(cfg.seed)
    rank, world_size = collectives.world()
    precision = precision or default_precision(parallel.unwrap(model))
    root = model if parallel.is_root(model) else parallel.prepare(model, cfg.parallelism, precision)
    root.train()
    device = parallel.device_of(root)
    enable_tf32(device)
    lockstep = parallel.is_sharded(root)
    eval_model = parallel.root_of(root)  # DDP's module: evaluation runs no reducer

    total_steps = plan_total_steps(objective, cfg, world_size, lockstep)
    if total_steps == 0:
        raise ValueError(
            f"{desc}: no training steps (check the data and max_seq_len/overlength; every one of the "
            f"{world_size} ranks needs at least one micro-batch per step)"
        )
    objective.before_training(root, precision)  # the initial weights: before a checkpoint replaces them
    optimizer = make_optimizer(root, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    step, start_epoch, start_batch = 0, 0, 0
    history: list[dict] = []
    dev_history: list[dict] = []
    resumed_from = None
    latest = checkpoints.latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        progress = checkpoints.load_checkpoint(latest, root, optimizer, scheduler)
        step, start_epoch, start_batch = progress["step"], progress["epoch"], progress["batch_offset"]
        history, dev_history = progress.get("history", []), progress.get("dev_history", [])
        resumed_from = str(latest)
    is_main = rank == 0
    if is_main:
        _rewrite_metrics(metrics_path, history + [{"split": "dev", **d} for d in dev_history])
    last_good = latest

    t0 = time.perf_counter()
    trained_tokens = 0
    dropped = 0
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True, disable=not is_main)
    done = step >= total_steps
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        batches = objective.epoch_plan(epoch)
        first = start_batch if epoch == start_epoch else 0
        plan = plan_epoch(len(batches), world_size, cfg.grad_accum, lockstep, start=first)
        if plan.dropped:
            dropped += len(plan.dropped)
            logger.warning(
                "%s epoch %d: %d tail micro-batch(es) left out (fewer than one per rank%s)",
                desc,
                epoch,
                len(plan.dropped),
                ", or not a multiple of the ranks under fsdp" if lockstep else "",
            )
        with _collate_ahead(objective, batches, plan.steps, device) as ahead:
            for s, indices in enumerate(plan.steps):
                step_t0 = time.perf_counter()
                mine = ahead.get()
                try:
                    totals = optimizer_step(root, optimizer, objective, mine, cfg.max_grad_norm, step, precision)
                except TrainingDivergedError as exc:
                    bar.close()
                    raise TrainingDivergedError(
                        f"{desc}: {exc} (epoch {epoch}); last good checkpoint: "
                        f"{last_good or 'none'}; try a lower lr or check the data"
                    ) from exc
                del mine
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
                    if tracker is not None:
                        tracker.log(record, step, prefix="train")
                bar.set_postfix(
                    loss=f"{totals.get('loss', float('nan')):.4f}",
                    lr=f"{lr:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
                bar.update(1)
                end_of_epoch = s == len(plan.steps) - 1
                done = step >= total_steps
                progress = {
                    "step": step,
                    "epoch": epoch + 1 if end_of_epoch else epoch,
                    "batch_offset": 0 if end_of_epoch else indices[-1] + 1,
                }
                if end_of_epoch and cfg.dev_every_epoch:
                    dev = {"step": step, "epoch": epoch, **_evaluate(objective, eval_model, precision)}
                    dev_history.append(dev)
                    if is_main:
                        _append_metrics(metrics_path, {"split": "dev", **dev})
                        if tracker is not None:
                            tracker.log(dev, step, prefix="dev")
                    logger.info("%s dev after epoch %d: %s", desc, epoch, _fmt(dev))
                    root.train()
                periodic = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
                if end_of_epoch or periodic or done:
                    last_good = checkpoints.save_checkpoint(
                        ckpt_root,
                        step,
                        root,
                        optimizer,
                        scheduler,
                        {**progress, "history": history, "dev_history": dev_history},
                        cfg.keep_checkpoints,
                    )
                if done:
                    break
    bar.close()
    if not dev_history or dev_history[-1]["step"] != step:
        dev = {"step": step, "epoch": cfg.epochs - 1, **_evaluate(objective, eval_model, precision)}
        dev_history.append(dev)
        if is_main:
            _append_metrics(metrics_path, {"split": "dev", **dev})
            if tracker is not None:
                tracker.log(dev, step, prefix="dev")
    root.train()
    elapsed = time.perf_counter() - t0
    logger.info(
        "%s finished: %d steps in %.1fs (%.0f tokens/s, %s); wrote %s",
        desc,
        step,
        elapsed,
        trained_tokens / max(elapsed, 1e-9),
        precision.describe(),
        out_dir,
    )
    return LoopResult(
        step,
        history,
        dev_history,
        last_good,
        elapsed,
        trained_tokens / max(elapsed, 1e-9),
        resumed_from,
        extra={"dropped_micro_batches": dropped, "precision": precision.describe(), "world_size": world_size},
        model=root,
    )


def _collate_ahead(
    objective: Objective, batches: list[list[int]], steps: list[list[int]], device: Any
) -> StepPrefetcher:
    """This rank's micro-batches of each of ``steps`` (indices into ``batches``), collated ahead on a thread and
    pinned for a non-blocking copy when the device is a GPU."""
    rank, world_size = collectives.world()

    def collate_step(s: int) -> list[TokenBatch]:
        return [objective.collate_train(batches[i]) for i in rank_share(steps[s], rank, world_size)]

    return StepPrefetcher(collate_step, len(steps), pin=torch.device(device).type == "cuda")


def _evaluate(objective: Objective, model: Any, precision: Precision) -> dict[str, float]:
    """Dev metrics in the compute dtype (the objective shards the dev set over the ranks and sums)."""
    with parallel.compute_context(model, precision):
        return objective.evaluate(model)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _rewrite_metrics(path: Path, history: list[dict]) -> None:
    """After a resume the log holds exactly the steps the checkpoint knows about (no duplicates)."""
    from steps.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))
