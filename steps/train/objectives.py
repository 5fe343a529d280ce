"""What is optimised: token-level NLL for SFT, a registered pairwise loss for preference training. Micro-batches
are planned as index lists (identical on every rank) and collated on demand, so a rank builds only its share;
dev evaluation and the reference scoring are dealt over the ranks and summed. A micro-batch's metrics stay on the
device (0-d tensors): the loop sums them and reads them once per step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from steps.config import TrainConfig
from steps.train import collectives, parallel, reference
from steps.train.batching import PairExample, SFTExample, TokenBatch, collate_pairs, collate_sft, make_batches
from steps.train.dealing import deal, deal_marked
from steps.train.logprobs import sequence_logprobs
from steps.train.pair_scores import adapters_disabled, score_pairs
from steps.train.precision import Precision
from steps.train.reference import References, ReferenceSource

#: What ``micro_step`` returns besides the loss: metric sums, 0-d tensors on the device (or plain floats).
Metrics = dict[str, torch.Tensor | float]


class _Batched:
    """Plans each epoch's micro-batches (a pure function of seed and epoch) and collates them on demand."""

    rows_per_example = 1

    def __init__(self, train: Sequence, dev: Sequence, pad_id: int, cfg: TrainConfig):
        self.train, self.dev, self.pad_id, self.cfg = list(train), list(dev), pad_id, cfg
        self._plans: dict[int, list[list[int]]] = {}

    def collate_examples(self, examples: Sequence[Any]) -> TokenBatch:
        """One micro-batch of these examples, as training lays it out."""
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
        return self.collate_examples([self.train[i] for i in indices])

    def collate_dev(self, indices: list[int]) -> TokenBatch:
        return self.collate_examples([self.dev[i] for i in indices])

    def before_training(self, model: Any, precision: Precision) -> None:
        """Called by the loop on every rank once the model is wrapped, before step 1 and before a checkpoint is
        restored (nothing to do here; preference objectives score their missing reference log-probs)."""

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
                batch = self.collate_dev(indices).to(device)
                for k, v in self._dev_totals(model, batch).items():
                    totals[k] = totals.get(k, 0.0) + (v if counts else 0.0)
        keys = sorted(totals)
        vector = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
        collectives.all_reduce_sum(vector, device, "dev metrics")
        return self._dev_metrics(dict(zip(keys, vector.tolist())))


class SFTObjective(_Batched):
    """Mean negative log-likelihood per target token over the whole optimizer step."""

    name = "sft"

    def collate_examples(self, examples: Sequence[SFTExample]) -> TokenBatch:
        return collate_sft(examples, self.pad_id, self.cfg.mask_source_tokens)

    def step_denominator(self, micro_batches: list[TokenBatch]) -> float:
        return float(sum(int(mb.target_mask[:, 1:].sum()) for mb in micro_batches))

    def micro_step(self, model: Any, batch: TokenBatch, denominator: float) -> tuple[torch.Tensor, Metrics]:
        sums, counts = sequence_logprobs(model, batch)
        loss = -sums.sum() / denominator
        return loss, {"loss": loss.detach(), "target_tokens": counts.sum()}

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
        refs: References | None = None,
    ):
        """``refs.live``: a live reference (a root from ``parallel.prepare_frozen``, laid out like the policy);
        ``refs.from_policy``: the reference is the policy being trained with its LoRA adapters disabled (the
        frozen base it started from, no second model). Otherwise pairs without reference scores are scored before
        step 1 (:meth:`before_training`) from ``refs.source`` (default: the policy before its first update)."""
        super().__init__(train, dev, pad_id, cfg)
        refs = refs or References()
        self.loss_fn, self.needs_reference, self.reference_model = loss_fn, needs_reference, refs.live
        self.reference_from_policy = refs.from_policy
        live = refs.live is not None or refs.from_policy
        self.reference_source = None if live or not needs_reference else (refs.source or ReferenceSource())
        self.name = getattr(loss_fn, "name", "preference")

    def before_training(self, model: Any, precision: Precision) -> None:
        """Score the pairs that lack reference log-probs, through ``model`` (the wrapped policy) or the separate
        reference, in the first epoch's layout (``steps.train.reference``)."""
        if self.reference_source is not None:
            reference.score_pending(self, model, precision, self.reference_source)

    def collate_examples(self, examples: Sequence[PairExample]) -> TokenBatch:
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
            raise RuntimeError(
                "this loss needs reference log-probs: train() scores them before step 1, or pass a live reference model"
            )
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

    def micro_step(self, model: Any, batch: TokenBatch, denominator: float) -> tuple[torch.Tensor, Metrics]:
        out, n = self._loss(model, batch)
        share = n / denominator
        loss = out.per_pair.sum() / denominator
        metrics: Metrics = {k: v * share for k, v in out.metric_tensors().items() if k != "loss"}
        metrics["loss"] = loss.detach()
        return loss, metrics

    def evaluate(self, model: Any) -> dict[str, float]:
        """The loss's metrics over the whole dev set, means over pairs. The pairs are scored by the shared scorer
        (``steps.train.pair_scores``: each rank its dealt batches, in lockstep), the sums all-reduced, then the loss
        is computed once on every dev pair, with reference sums scored alike or taken from the pairs."""
        if not self.dev:
            return {}
        device = parallel.device_of(model)
        rank, world_size = collectives.world()
        plan = deal_marked(self.dev_plan(), rank, world_size, lockstep=True)
        scored = [score_pairs(model, self.dev, plan, self.collate_examples, show_progress=False)]
        reference_scorer = self._dev_reference_scorer(model)
        if reference_scorer is not None:
            with reference_scorer as scorer:
                scored.append(score_pairs(scorer, self.dev, plan, self.collate_examples, show_progress=False)[:, :2])
        sums = torch.cat(scored, dim=1)
        collectives.all_reduce_sum(sums, device, "dev metrics")
        sums = sums.float()  # the loss gets fp32 sums, as in training
        ref_c, ref_r = (sums[:, 4], sums[:, 5]) if sums.shape[1] > 4 else self._stored_reference(device)
        with torch.no_grad():
            out = self.loss_fn(*sums[:, :4].unbind(1), reference_chosen_logps=ref_c, reference_rejected_logps=ref_r)
        return {f"dev_{k}": v for k, v in out.metrics.items()} | {"dev_pairs": float(len(self.dev))}

    def _dev_reference_scorer(self, model: Any) -> contextlib.AbstractContextManager[Any] | None:
        """What scores the dev pairs' reference sums: the policy with its adapters off, or the live reference; None
        where the loss needs none or every dev pair carries its sums (scored before step 1 or given with the data)."""
        if not self.needs_reference or not reference.has_pending(self.dev):
            return None
        if self.reference_from_policy:
            return adapters_disabled(model)
        if self.reference_model is not None:
            return contextlib.nullcontext(self.reference_model)
        raise RuntimeError(
            "this loss needs reference log-probs: train() scores them before step 1, or pass a live reference model"
        )

    def _stored_reference(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The dev pairs' own reference sums in fp32 (None, None: a reference-free loss)."""
        if not self.needs_reference:
            return None, None
        given = torch.tensor([(p.reference_chosen, p.reference_rejected) for p in self.dev], dtype=torch.float64)
        chosen, rejected = given.to(device).float().unbind(1)
        return chosen, rejected


def adapters_disabled_logprobs(model: Any, batch: TokenBatch) -> torch.Tensor:
    """Per-row log-prob sums of ``model`` (a peft policy, or the training root around one) with its adapters
    disabled, without autograd (``pair_scores.adapters_disabled``; DDP's module: no reducer for a no-grad pass)."""
    with torch.no_grad(), adapters_disabled(model) as base:
        return sequence_logprobs(base, batch)[0]


def precompute_reference(
    model: Any,
    pairs: list[PairExample],
    pad_id: int,
    cfg: TrainConfig,
    desc: str = "reference log-probs",
    precision: Precision | None = None,
) -> None:
    """Fill ``reference_chosen/rejected`` of ``pairs`` ahead of training with any ``model`` (tools and notebooks;
    the trainer itself scores missing ones in its own layout, ``PreferenceObjective.before_training``).

    Batches are planned alike on every rank (sorted by length, not shuffled) and dealt round-robin; one all-reduce
    gives every rank every score. ``precision``: compute in its compute context."""
    todo = [i for i, p in enumerate(pairs) if p.reference_chosen is None or p.reference_rejected is None]
    if not todo:
        return
    device = parallel.device_of(model)
    rank, world_size = collectives.world()
    subset = [pairs[i] for i in todo]
    batches = make_batches(
        subset, cfg.max_num_tokens, 0, 0, rows_per_example=2, shuffle=False, max_examples=cfg.max_batch_examples
    )
    plan = [(b, True) for b in deal(batches, rank, world_size)]

    def collate(examples: list[PairExample]) -> TokenBatch:
        return collate_pairs(examples, pad_id, cfg.mask_source_tokens)

    with reference.autocast_or_nothing(model, precision):
        scores = score_pairs(model, subset, plan, collate, desc=desc, show_progress=rank == 0)
    collectives.all_reduce_sum(scores, device, "reference log-probs")  # the whole tensor: a column view is strided
    for ex, (c, r, _, _) in zip(subset, scores.tolist()):
        ex.reference_chosen, ex.reference_rejected = c, r
