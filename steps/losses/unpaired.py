"""Shared pieces of the losses that learn from unpaired feedback (``data_kind = "unpaired"``, e.g. KTO): one
response per example with a desirable/undesirable label, plus "KL rows" (a prompt scored with another example's
completion) from which a loss may estimate KL(policy ‖ reference). A loss writes ``compute_unpaired``; the
validated batch, fp32 and the metrics live here, as ``base`` does for pairwise losses."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any

import torch

from steps.losses.base import LossInputError, LossOutput, MissingReferenceError, PreferenceLoss, PreferencePairs


def _as_fp32_or_fp64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.to(torch.float32)


def _check_vector(name: str, value: Any, size: int | None) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise LossInputError(f"{name} must have shape [N] (one value per row), got {shape}")
    if size is not None and value.shape[0] != size:
        raise LossInputError(f"{name} has {value.shape[0]} entries but must have {size} (one per row)")
    if name != "labels" and not value.is_floating_point():
        raise LossInputError(f"{name} must be a float tensor of summed log-probs, got dtype {value.dtype}")


@dataclass(frozen=True)
class UnpairedExamples:
    """B labelled examples and K KL rows, validated and in (at least) fp32 once constructed.

    ``logps``: summed completion log-probs S(y_i | x_i) under the policy [B]; ``labels``: True = desirable [B]
    (bool); ``reference_logps``: the reference's sums R(y_i | x_i) [B] or None. ``kl_logps`` /
    ``reference_kl_logps``: the same sums for K mismatched rows (x_i, y_j), j ≠ i ([K], K may be 0; both or
    neither). ``kl``: a KL estimate computed elsewhere (e.g. over every rank's KL rows): a scalar that replaces
    the one a loss would estimate from this batch's KL rows.
    """

    logps: torch.Tensor
    labels: torch.Tensor
    reference_logps: torch.Tensor | None = None
    kl_logps: torch.Tensor | None = None
    reference_kl_logps: torch.Tensor | None = None
    kl: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_vector("policy_logps", self.logps, None)
        size = self.logps.shape[0]
        if size == 0:
            raise LossInputError("the batch is empty (B = 0): an unpaired loss needs at least one example")
        _check_vector("labels", self.labels, size)
        if self.labels.dtype != torch.bool:
            raise LossInputError(f"labels must be a bool tensor (True = desirable), got dtype {self.labels.dtype}")
        if self.reference_logps is not None:
            _check_vector("reference_logps", self.reference_logps, size)
        if (self.kl_logps is None) != (self.reference_kl_logps is None):
            missing = "policy_kl_logps" if self.kl_logps is None else "reference_kl_logps"
            raise LossInputError(f"{missing} is None but its partner is not: pass both KL-row sums or neither")
        if self.kl_logps is not None and self.reference_kl_logps is not None:
            _check_vector("policy_kl_logps", self.kl_logps, None)
            _check_vector("reference_kl_logps", self.reference_kl_logps, self.kl_logps.shape[0])
        if self.kl is not None:
            if not isinstance(self.kl, torch.Tensor) or self.kl.numel() != 1 or not self.kl.is_floating_point():
                raise LossInputError(f"kl must be a float tensor holding one number, got {self.kl!r:.80}")
            if not bool(torch.isfinite(self.kl).all()):
                raise LossInputError(f"kl must be finite, got {float(self.kl)}")
        dtype = _as_fp32_or_fp64(self.logps).dtype
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name != "labels":
                object.__setattr__(self, f.name, _as_fp32_or_fp64(value).to(dtype))  # frozen: set once, here

    @property
    def batch_size(self) -> int:
        return self.logps.shape[0]

    @property
    def kl_rows(self) -> int:
        """K, the KL rows this batch carries (0 without any)."""
        return 0 if self.kl_logps is None else self.kl_logps.shape[0]

    def reference_sums(self) -> torch.Tensor:
        """R(y_i | x_i); raises MissingReferenceError when the batch has none."""
        if self.reference_logps is None:
            raise MissingReferenceError(
                "this loss needs reference log-probs: pass reference_logps (summed over the same completion tokens "
                "as the policy sums)"
            )
        return self.reference_logps


@dataclass
class UnpairedLossOutput:
    """What ``compute_unpaired`` returns: weighted per-example losses [B], implicit rewards [B], the labels [B],
    the reference point ``kl`` (a detached scalar) and how many KL rows estimated it (``kl_rows``; 0 when the KL
    came from outside the batch or no row existed). ``loss`` is the mean over examples.

    ``totals()`` are sums a trainer can add over micro-batches and ranks; ``metrics`` the batch means (TRL's names
    where it has them): rewards of the desirable and the undesirable examples (absent when the batch has none),
    their difference ``reward_margin``, ``reward_accuracy`` (share of examples whose reward lies on their label's
    side of the reference point: desirable above, undesirable below; ties count as wrong), ``kl`` and counts.
    """

    per_example: torch.Tensor
    rewards: torch.Tensor
    labels: torch.Tensor
    kl: torch.Tensor
    kl_rows: int = 0
    reference_point: torch.Tensor | None = None  # where rewards are compared (KTO: β·KL); None: 0

    @property
    def loss(self) -> torch.Tensor:
        return self.per_example.mean()

    def totals(self) -> dict[str, float]:
        """Additive sums of this batch (read back in one transfer): loss_sum, rewards_{desirable,undesirable}_sum,
        count_{desirable,undesirable}, correct (examples on their label's side of the reference point)."""
        with torch.no_grad():
            rewards, labels = self.rewards.detach(), self.labels
            point = self.reference_point.detach() if self.reference_point is not None else rewards.new_zeros(())
            right = torch.where(labels, rewards > point, rewards < point)
            zero = rewards.new_zeros(())
            values = torch.stack(
                [
                    self.per_example.detach().sum(),
                    torch.where(labels, rewards, zero).sum(),
                    torch.where(labels, zero, rewards).sum(),
                    labels.to(rewards.dtype).sum(),
                    (~labels).to(rewards.dtype).sum(),
                    right.to(rewards.dtype).sum(),
                ]
            ).tolist()
        names = (
            "loss_sum",
            "rewards_desirable_sum",
            "rewards_undesirable_sum",
            "count_desirable",
            "count_undesirable",
            "correct",
        )
        return dict(zip(names, values))

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        return summarise(self.totals(), float(self.kl))


def summarise(totals: dict[str, float], kl: float) -> dict[str, float]:
    """Means from additive totals (one batch's, or summed over a step's micro-batches and ranks)."""
    desirable, undesirable = totals["count_desirable"], totals["count_undesirable"]
    examples = desirable + undesirable
    out = {
        "loss": totals["loss_sum"] / examples,
        "kl": kl,
        "reward_accuracy": totals["correct"] / examples,
        "count_desirable": desirable,
        "count_undesirable": undesirable,
    }
    if desirable:
        out["rewards_desirable"] = totals["rewards_desirable_sum"] / desirable
    if undesirable:
        out["rewards_undesirable"] = totals["rewards_undesirable_sum"] / undesirable
    if desirable and undesirable:
        out["reward_margin"] = out["rewards_desirable"] - out["rewards_undesirable"]
    return out


class UnpairedLoss(PreferenceLoss):
    """A registered loss over unpaired feedback: subclasses set ``config_class`` and ``requires_reference`` and
    write ``compute_unpaired(examples) -> UnpairedLossOutput``; ``loss.unpaired(...)`` validates and calls it.

    It is still a PreferenceLoss (one registry, one config path), but the pairwise call refuses clearly: a trainer
    must feed it labelled single responses (steps.train.unpaired does)."""

    data_kind = "unpaired"

    def compute(self, pairs: PreferencePairs) -> LossOutput:
        raise LossInputError(
            f"loss {self.name!r} learns from unpaired feedback (prompt, completion, desirable?), not from "
            "chosen/rejected pairs: train it with steps.train.unpaired (the prepared kto.{train,dev}.jsonl, which "
            "prepare_data also derives from any pair file) or pick a pairwise loss"
        )

    def compute_unpaired(self, examples: UnpairedExamples) -> UnpairedLossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_unpaired(examples)")

    def unpaired(
        self,
        policy_logps: torch.Tensor,
        labels: torch.Tensor,
        reference_logps: torch.Tensor | None = None,
        policy_kl_logps: torch.Tensor | None = None,
        reference_kl_logps: torch.Tensor | None = None,
        *,
        kl: torch.Tensor | None = None,
    ) -> UnpairedLossOutput:
        """The loss of B labelled examples (see UnpairedExamples for the arguments)."""
        examples = UnpairedExamples(policy_logps, labels, reference_logps, policy_kl_logps, reference_kl_logps, kl)
        if self.requires_reference and examples.reference_logps is None:
            raise MissingReferenceError(
                f"loss {self.name!r} needs reference log-probs: pass reference_logps (and reference_kl_logps for "
                "the KL rows), precomputed or from the frozen reference model"
            )
        out = self.compute_unpaired(examples)
        if out.per_example.shape != (examples.batch_size,):
            raise RuntimeError(
                f"{type(self).__name__}.compute_unpaired returned per_example of shape "
                f"{tuple(out.per_example.shape)}, expected ({examples.batch_size},)"
            )
        return out
