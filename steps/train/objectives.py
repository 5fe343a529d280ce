"""What is optimised: token-level NLL for SFT, a registered pairwise loss for preference training."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from steps.config import TrainConfig
from steps.train.batching import PairExample, SFTExample, TokenBatch, collate_pairs, collate_sft, make_batches
from steps.train.logprobs import sequence_logprobs


class _Batched:
    """Caches each epoch's micro-batches (a pure function of seed and epoch)."""

    rows_per_example = 1

    def __init__(self, train: Sequence, dev: Sequence, pad_id: int, cfg: TrainConfig):
        self.train, self.dev, self.pad_id, self.cfg = list(train), list(dev), pad_id, cfg
        self._cache: dict[int, list[TokenBatch]] = {}

    def _collate(self, examples) -> TokenBatch:
        raise NotImplementedError

    def _epoch_indices(self, epoch: int) -> list[list[int]]:
        return make_batches(
            self.train,
            self.cfg.max_num_tokens,
            self.cfg.seed,
            epoch,
            self.rows_per_example,
            max_examples=self.cfg.max_batch_examples,
        )

    def epoch_batch_count(self, epoch: int) -> int:
        """Micro-batches in ``epoch``, without collating them (the loop plans its steps with this)."""
        return len(self._epoch_indices(epoch))

    def epoch_batches(self, epoch: int) -> list[TokenBatch]:
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = [self._collate([self.train[i] for i in b]) for b in self._epoch_indices(epoch)]
        return self._cache[epoch]

    def dev_batches(self) -> list[TokenBatch]:
        idx = make_batches(
            self.dev,
            self.cfg.max_num_tokens,
            0,
            0,
            self.rows_per_example,
            shuffle=False,
            max_examples=self.cfg.max_batch_examples,
        )
        return [self._collate([self.dev[i] for i in b]) for b in idx]


class SFTObjective(_Batched):
    """Mean negative log-likelihood per target token over the whole optimizer step."""

    name = "sft"

    def _collate(self, examples: Sequence[SFTExample]) -> TokenBatch:
        return collate_sft(examples, self.pad_id, self.cfg.mask_source_tokens)

    def step_denominator(self, micro_batches: list[TokenBatch]) -> float:
        return float(sum(int(mb.target_mask[:, 1:].sum()) for mb in micro_batches))

    def micro_step(self, model, batch: TokenBatch, denominator: float):
        sums, counts = sequence_logprobs(model, batch)
        loss = -sums.sum() / denominator
        return loss, {"loss": float(loss.detach()), "target_tokens": float(counts.sum())}

    def evaluate(self, model) -> dict[str, float]:
        if not self.dev:
            return {}
        device = next(model.parameters()).device
        model.eval()
        nll, tokens = 0.0, 0.0
        with torch.no_grad():
            for mb in self.dev_batches():
                sums, counts = sequence_logprobs(model, mb.to(device))
                nll -= float(sums.sum())
                tokens += float(counts.sum())
        loss = nll / max(tokens, 1.0)
        return {"dev_loss": loss, "dev_perplexity": math.exp(min(loss, 50.0)), "dev_tokens": tokens}


class PreferenceObjective(_Batched):
    """A registered pairwise loss; chosen and rejected rows go through one forward pass."""

    rows_per_example = 2

    def __init__(self, train, dev, pad_id, cfg: TrainConfig, loss_fn, needs_reference: bool, reference_model=None):
        super().__init__(train, dev, pad_id, cfg)
        self.loss_fn, self.needs_reference, self.reference_model = loss_fn, needs_reference, reference_model
        self.name = getattr(loss_fn, "name", "preference")

    def _collate(self, examples: Sequence[PairExample]) -> TokenBatch:
        return collate_pairs(examples, self.pad_id, self.cfg.mask_source_tokens)

    def step_denominator(self, micro_batches: list[TokenBatch]) -> float:
        return float(sum(mb.extra["num_pairs"] for mb in micro_batches))

    def _reference(self, batch: TokenBatch, n: int):
        if not self.needs_reference:
            return None, None
        if "reference_chosen" in batch.extra:
            return batch.extra["reference_chosen"].float(), batch.extra["reference_rejected"].float()
        if self.reference_model is None:
            raise RuntimeError("this loss needs reference log-probs: precompute them or pass a live reference model")
        with torch.no_grad():
            ref, _ = sequence_logprobs(self.reference_model, batch)
        return ref[:n], ref[n:]

    def _loss(self, model, batch: TokenBatch):
        n = batch.extra["num_pairs"]
        sums, counts = sequence_logprobs(model, batch)
        ref_c, ref_r = self._reference(batch, n)
        return self.loss_fn(
            sums[:n], sums[n:], counts[:n], counts[n:], reference_chosen_logps=ref_c, reference_rejected_logps=ref_r
        ), n

    def micro_step(self, model, batch: TokenBatch, denominator: float):
        out, n = self._loss(model, batch)
        share = n / denominator
        loss = out.per_pair.sum() / denominator
        metrics = {k: float(v) * share for k, v in out.metrics.items() if k != "loss"}
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def evaluate(self, model) -> dict[str, float]:
        if not self.dev:
            return {}
        device = next(model.parameters()).device
        model.eval()
        totals: dict[str, float] = {}
        pairs = 0
        with torch.no_grad():
            for mb in self.dev_batches():
                out, n = self._loss(model, mb.to(device))
                pairs += n
                totals["loss"] = totals.get("loss", 0.0) + float(out.per_pair.sum())
                for k, v in out.metrics.items():
                    if k != "loss":
                        totals[k] = totals.get(k, 0.0) + float(v) * n
        return {f"dev_{k}": v / pairs for k, v in totals.items()} | {"dev_pairs": float(pairs)}


def precompute_reference(
    model, pairs: list[PairExample], pad_id: int, cfg: TrainConfig, desc: str = "reference log-probs"
) -> None:
    """Fill ``reference_chosen/rejected`` once, in a no-grad pass, so the reference model need not stay resident."""
    from tqdm.auto import tqdm

    todo = [i for i, p in enumerate(pairs) if p.reference_chosen is None or p.reference_rejected is None]
    if not todo:
        return
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    subset = [pairs[i] for i in todo]
    batches = make_batches(
        subset, cfg.max_num_tokens, 0, 0, rows_per_example=2, shuffle=False, max_examples=cfg.max_batch_examples
    )
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, unit="batch"):
            examples = [subset[i] for i in b]
            mb = collate_pairs(examples, pad_id, cfg.mask_source_tokens).to(device)
            sums, _ = sequence_logprobs(model, mb)
            n = len(examples)
            for ex, c, r in zip(examples, sums[:n].tolist(), sums[n:].tolist()):
                ex.reference_chosen, ex.reference_rejected = c, r
    model.train(was_training)
