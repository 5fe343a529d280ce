"""What is optimised: token-level NLL for SFT, a registered pairwise loss for preference training. Micro-batches
are planned as index lists (identical on every rank) and collated on demand, so a rank builds only its share;
dev evaluation and the reference precompute are dealt over the ranks and summed."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from steps.config import TrainConfig
from steps.train import collectives, parallel
from steps.train.batching import PairExample, SFTExample, TokenBatch, collate_pairs, collate_sft, make_batches
from steps.train.dealing import deal, deal_marked
from steps.train.logprobs import sequence_logprobs
from steps.train.precision import Precision


class _Batched:
    """Plans each epoch's micro-batches (a pure function of seed and epoch) and collates them on demand."""

    rows_per_example = 1

    def __init__(self, train: Sequence, dev: Sequence, pad_id: int, cfg: TrainConfig):
        self.train, self.dev, self.pad_id, self.cfg = list(train), list(dev), pad_id, cfg
        self._plans: dict[int, list[list[int]]] = {}

    def _collate(self, examples: Sequence[Any]) -> TokenBatch:
        raise NotImplementedError

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Example indices of each micro-batch of ``epoch`` (the same on every rank; nothing collated)."""
        if epoch not in self._plans:
            self._plans = {
                epoch: make_batches(
                    self.train,
                    self.cfg.max_num_tokens,
                    self.cfg.seed,
                    epoch,
                    self.rows_per_example,
                    max_examples=self.cfg.max_batch_examples,
                )
            }
        return self._plans[epoch]

    def epoch_batch_count(self, epoch: int) -> int:
        """Micro-batches in ``epoch``, without collating them (the loop plans its steps with this)."""
        return len(self.epoch_plan(epoch))

    def collate_train(self, indices: list[int]) -> TokenBatch:
        return self._collate([self.train[i] for i in indices])

    def epoch_batches(self, epoch: int) -> list[TokenBatch]:
        """Every micro-batch of ``epoch`` collated (for tools such as the benchmark; the loop collates lazily)."""
        return [self.collate_train(b) for b in self.epoch_plan(epoch)]

    def dev_plan(self) -> list[list[int]]:
        return make_batches(
            self.dev,
            self.cfg.max_num_tokens,
            0,
            0,
            self.rows_per_example,
            shuffle=False,
            max_examples=self.cfg.max_batch_examples,
        )

    def _dev_totals(self, model: Any, batch: TokenBatch) -> dict[str, float]:
        raise NotImplementedError

    def _dev_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, model: Any) -> dict[str, float]:
        """Dev metrics over the whole dev set: each rank scores its dealt batches, the sums are all-reduced.

        Every rank runs the same number of forwards (FSDP2 gathers weights in each): short shares repeat a batch
        whose sums are discarded; that also gives every rank the metric names."""
        if not self.dev:
            return {}
        device = parallel.device_of(model)
        rank, world_size = collectives.world()
        model.eval()
        totals: dict[str, float] = {}
        with torch.no_grad():
            for indices, counts in deal_marked(self.dev_plan(), rank, world_size, lockstep=True):
                batch = self._collate([self.dev[i] for i in indices]).to(device)
                for k, v in self._dev_totals(model, batch).items():
                    totals[k] = totals.get(k, 0.0) + (v if counts else 0.0)
        keys = sorted(totals)
        vector = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
        collectives.all_reduce_sum(vector, device, "dev metrics")
        return self._dev_metrics(dict(zip(keys, vector.tolist())))


class SFTObjective(_Batched):
    """Mean negative log-likelihood per target token over the whole optimizer step."""

    name = "sft"

    def _collate(self, examples: Sequence[SFTExample]) -> TokenBatch:
        return collate_sft(examples, self.pad_id, self.cfg.mask_source_tokens)

    def step_denominator(self, micro_batches: list[TokenBatch]) -> float:
        return float(sum(int(mb.target_mask[:, 1:].sum()) for mb in micro_batches))

    def micro_step(self, model: Any, batch: TokenBatch, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        sums, counts = sequence_logprobs(model, batch)
        loss = -sums.sum() / denominator
        return loss, {"loss": float(loss.detach()), "target_tokens": float(counts.sum())}

    def _dev_totals(self, model: Any, batch: TokenBatch) -> dict[str, float]:
        sums, counts = sequence_logprobs(model, batch)
        return {"nll": -float(sums.sum()), "tokens": float(counts.sum())}

    def _dev_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        loss = totals["nll"] / max(totals["tokens"], 1.0)
        return {"dev_loss": loss, "dev_perplexity": math.exp(min(loss, 50.0)), "dev_tokens": totals["tokens"]}


class PreferenceObjective(_Batched):
    """A registered pairwise loss; chosen and rejected rows go through one forward pass."""

    rows_per_example = 2

    def __init__(
        self,
        train: Sequence[PairExample],
        dev: Sequence[PairExample],
        pad_id: int,
        cfg: TrainConfig,
        loss_fn: Any,
        needs_reference: bool,
        reference_model: Any = None,
        *,
        reference_from_policy: bool = False,
    ):
        """``reference_model``: a live reference; ``reference_from_policy``: the reference is the policy being
        trained with its LoRA adapters disabled (the frozen base it started from, no second model)."""
        super().__init__(train, dev, pad_id, cfg)
        self.loss_fn, self.needs_reference, self.reference_model = loss_fn, needs_reference, reference_model
        self.reference_from_policy = reference_from_policy
        self.name = getattr(loss_fn, "name", "preference")

    def _collate(self, examples: Sequence[PairExample]) -> TokenBatch:
        return collate_pairs(examples, self.pad_id, self.cfg.mask_source_tokens)

    def step_denominator(self, micro_batches: list[TokenBatch]) -> float:
        return float(sum(mb.extra["num_pairs"] for mb in micro_batches))

    def reference_logprobs(self, model: Any, batch: TokenBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reference sums for the chosen and the rejected rows of ``batch`` (None, None: a reference-free loss).

        From the batch when precomputed, else from the live reference, else (``reference_from_policy``) from
        ``model``, the policy being trained, with its adapters disabled."""
        if not self.needs_reference:
            return None, None
        n = batch.extra["num_pairs"]
        if "reference_chosen" in batch.extra:
            return batch.extra["reference_chosen"].float(), batch.extra["reference_rejected"].float()
        if self.reference_from_policy:
            ref = adapters_disabled_logprobs(model, batch)
        elif self.reference_model is None:
            raise RuntimeError("this loss needs reference log-probs: precompute them or pass a live reference model")
        else:
            with torch.no_grad():
                ref, _ = sequence_logprobs(self.reference_model, batch)
        return ref[:n], ref[n:]

    def _loss(self, model: Any, batch: TokenBatch) -> tuple[Any, int]:
        n = batch.extra["num_pairs"]
        ref_c, ref_r = self.reference_logprobs(model, batch)  # first: the policy's graph is built with adapters on
        sums, counts = sequence_logprobs(model, batch)
        return self.loss_fn(
            sums[:n], sums[n:], counts[:n], counts[n:], reference_chosen_logps=ref_c, reference_rejected_logps=ref_r
        ), n

    def micro_step(self, model: Any, batch: TokenBatch, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        out, n = self._loss(model, batch)
        share = n / denominator
        loss = out.per_pair.sum() / denominator
        metrics = {k: float(v) * share for k, v in out.metrics.items() if k != "loss"}
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def _dev_totals(self, model: Any, batch: TokenBatch) -> dict[str, float]:
        out, n = self._loss(model, batch)
        totals = {"loss": float(out.per_pair.sum()), "pairs": float(n)}
        totals.update({k: float(v) * n for k, v in out.metrics.items() if k != "loss"})
        return totals

    def _dev_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        pairs = totals.pop("pairs")
        return {f"dev_{k}": v / pairs for k, v in totals.items()} | {"dev_pairs": pairs}


def adapters_disabled_logprobs(model: Any, batch: TokenBatch) -> torch.Tensor:
    """Per-row log-prob sums of ``model`` (a peft policy, or the training root around one) with its adapters
    disabled, without autograd: the frozen base's numbers from the weights already in memory."""
    lm = parallel.unwrap(model)
    if not hasattr(lm, "disable_adapter"):
        raise RuntimeError(
            f"reference_from_policy needs a policy with LoRA adapters (peft); got {type(lm).__name__}: "
            "enable lora, or give a reference model"
        )
    with torch.no_grad(), lm.disable_adapter():
        return sequence_logprobs(lm, batch)[0]


def precompute_reference(
    model: Any,
    pairs: list[PairExample],
    pad_id: int,
    cfg: TrainConfig,
    desc: str = "reference log-probs",
    precision: Precision | None = None,
) -> None:
    """Fill ``reference_chosen/rejected`` once, in a no-grad pass, so the reference model need not stay resident.

    The batches are planned alike on every rank and dealt round-robin; each rank scores its own and one
    all-reduce (on the device) gives every rank every score: the same numbers as one process computes.
    ``precision``: compute under its autocast (the run's compute dtype)."""
    from tqdm.auto import tqdm

    todo = [i for i, p in enumerate(pairs) if p.reference_chosen is None or p.reference_rejected is None]
    if not todo:
        return
    device = parallel.device_of(model)
    rank, world_size = collectives.world()
    was_training = model.training
    model.eval()
    subset = [pairs[i] for i in todo]
    batches = make_batches(
        subset, cfg.max_num_tokens, 0, 0, rows_per_example=2, shuffle=False, max_examples=cfg.max_batch_examples
    )
    scores = torch.zeros((len(subset), 2), dtype=torch.float64, device=device)
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for b in tqdm(deal(batches, rank, world_size), desc=desc, unit="batch", disable=rank != 0):
            mb = collate_pairs([subset[i] for i in b], pad_id, cfg.mask_source_tokens).to(device)
            sums, _ = sequence_logprobs(model, mb)
            index = torch.tensor(b, dtype=torch.long, device=device)
            scores[index, 0] = sums[: len(b)].double()
            scores[index, 1] = sums[len(b) :].double()
    collectives.all_reduce_sum(scores, device, "reference log-probs")
    for ex, (c, r) in zip(subset, scores.tolist()):
        ex.reference_chosen, ex.reference_rejected = c, r
    model.train(was_training)
