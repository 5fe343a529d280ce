"""Shared pieces of every preference loss: the validated batch, the output, the base class and the errors. A loss
only writes the maths (``compute``); input checks, fp32, metrics and
the mean over pairs live here once, so every loss behaves the same for the trainer."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F


class UnknownLossError(ValueError):
    """A loss name that is not registered."""


class LossConfigError(ValueError):
    """A bad loss hyperparameter; ``field`` names the offending config field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class LossInputError(ValueError):
    """Tensors handed to a loss that do not have the shapes, dtypes or values it needs."""


class MissingReferenceError(LossInputError):
    """A loss that needs reference log-probs was called without them."""


def _as_compute_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """fp16/bf16/int inputs are promoted to fp32; fp32 and fp64 are kept (fp64 keeps gradcheck exact)."""
    if tensor.dtype in (torch.float32, torch.float64):
        return tensor
    return tensor.to(torch.float32)


#: The name a PreferencePairs field has as an argument of ``PreferenceLoss.__call__`` (what input errors say).
_ARGUMENT_NAMES = {"chosen_logps": "policy_chosen_logps", "rejected_logps": "policy_rejected_logps"}


@dataclass(frozen=True)
class PreferencePairs:
    """One batch of B preference pairs, validated and in (at least) fp32 once constructed.

    ``chosen_logps``/``rejected_logps`` are summed response log-probs S(y); ``*_lengths`` are the token
    counts |y| the sums ran over; ``reference_*`` are the reference model's sums R(y) or None. Construction checks
    shapes, dtypes and lengths (no device sync but one) and casts; errors name ``PreferenceLoss``'s arguments.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    reference_chosen_logps: torch.Tensor | None = None
    reference_rejected_logps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        named = {_ARGUMENT_NAMES.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        if (self.reference_chosen_logps is None) != (self.reference_rejected_logps is None):
            missing = "reference_chosen_logps" if self.reference_chosen_logps is None else "reference_rejected_logps"
            raise LossInputError(f"{missing} is None but its partner is not: pass both reference sums or neither")
        chosen_logps = self.chosen_logps
        batch_size = chosen_logps.shape[0] if isinstance(chosen_logps, torch.Tensor) else None
        for name, value in named.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise LossInputError(f"{name} must have shape [B] (one value per pair), got {shape}")
            if value.shape[0] != batch_size:
                raise LossInputError(
                    f"{name} has {value.shape[0]} entries but policy_chosen_logps has "
                    f"{batch_size}: every input must hold one value per pair"
                )
            if name.endswith("_lengths") and value.dtype == torch.bool:
                raise LossInputError(f"{name} must hold token counts (int or float), got dtype torch.bool")
            if not name.endswith("_lengths") and not value.is_floating_point():
                raise LossInputError(f"{name} must be a float tensor of summed log-probs, got dtype {value.dtype}")
        if batch_size == 0:
            raise LossInputError("the batch is empty (B = 0): a preference loss needs at least one pair")
        chosen_lengths, rejected_lengths = self.chosen_lengths, self.rejected_lengths
        if bool((torch.minimum(chosen_lengths, rejected_lengths) <= 0).any()):
            bad = "chosen_lengths" if bool((chosen_lengths <= 0).any()) else "rejected_lengths"
            raise LossInputError(
                f"{bad} must be > 0 for every pair (token count of the response, end token "
                f"included); got {(chosen_lengths if bad == 'chosen_lengths' else rejected_lengths).tolist()}"
            )
        dtype = _as_compute_dtype(chosen_logps).dtype
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, _as_compute_dtype(value).to(dtype))  # frozen: set once, here

    @property
    def batch_size(self) -> int:
        return self.chosen_logps.shape[0]

    @property
    def has_reference(self) -> bool:
        return self.reference_chosen_logps is not None

    @property
    def chosen_mean_logps(self) -> torch.Tensor:
        """A(y_w) = S(y_w) / |y_w|."""
        return self.chosen_logps / self.chosen_lengths

    @property
    def rejected_mean_logps(self) -> torch.Tensor:
        """A(y_l) = S(y_l) / |y_l|."""
        return self.rejected_logps / self.rejected_lengths

    @property
    def chosen_nll(self) -> torch.Tensor:
        """Per-token negative log-likelihood of the chosen response, NLL = −A(y_w), shape [B]."""
        return -self.chosen_mean_logps

    def reference_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R(y_w), R(y_l)); raises MissingReferenceError when the batch has none."""
        if self.reference_chosen_logps is None or self.reference_rejected_logps is None:
            raise MissingReferenceError(
                "this loss needs reference log-probs: pass reference_chosen_logps and reference_rejected_logps "
                "(summed over the same response tokens as the policy sums)"
            )
        return self.reference_chosen_logps, self.reference_rejected_logps

    def reference_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(RA(y_w), RA(y_l)) = reference sums divided by the response lengths."""
        ref_chosen, ref_rejected = self.reference_sums()
        return ref_chosen / self.chosen_lengths, ref_rejected / self.rejected_lengths


@dataclass
class LossOutput:
    """What a loss's ``compute`` returns: per-pair losses [B], per-pair rewards [B] and extra [B] metrics.

    ``loss`` is the differentiable mean over pairs; ``metrics`` the batch means as floats for logging,
    read back from the device in one transfer.
    """

    per_pair: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    extra_metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    nll: torch.Tensor | None = None  # the chosen per-token NLL [B], filled in by PreferenceLoss.__call__

    @property
    def loss(self) -> torch.Tensor:
        return self.per_pair.mean()

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """The batch means of :attr:`metrics` as 0-d tensors on the loss's device (no host sync: a trainer sums
        them over micro-batches and reads them once per step)."""
        with torch.no_grad():
            chosen, rejected = self.rewards_chosen.detach(), self.rewards_rejected.detach()
            values = {
                "loss": self.per_pair.detach().mean(),
                "rewards_chosen": chosen.mean(),
                "rewards_rejected": rejected.mean(),
                "reward_margin": (chosen - rejected).mean(),
                "reward_accuracy": (chosen > rejected).to(chosen.dtype).mean(),
            }
            if self.nll is not None:
                values["nll"] = self.nll.detach().mean()
            for name, value in self.extra_metrics.items():
                if name in values:
                    raise RuntimeError(f"extra metric {name!r} clashes with a common metric name")
                values[name] = value.detach().to(chosen.dtype).mean()
            return {k: v.to(chosen.dtype) for k, v in values.items()}

    @functools.cached_property
    def metrics(self) -> dict[str, float]:
        tensors = self.metric_tensors()
        numbers = torch.stack(list(tensors.values())).tolist() if tensors else []
        return dict(zip(tensors, numbers))


def with_nll(per_pair: torch.Tensor, pairs: PreferencePairs, nll_scale: float) -> torch.Tensor:
    """``per_pair`` plus ``nll_scale`` times the chosen response's per-token NLL (the term several losses add)."""
    return per_pair + nll_scale * pairs.chosen_nll if nll_scale > 0.0 else per_pair


def logistic_loss(
    pairs: PreferencePairs,
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: float = 0.0,
    nll_scale: float = 0.0,
) -> LossOutput:
    """ℓ = −log σ(z) + nll_scale·NLL for z = r_w − r_l − margin, with z reported as the ``logits`` metric."""
    logits = rewards_chosen - rewards_rejected
    if margin:
        logits = logits - margin
    per_pair = with_nll(-F.logsigmoid(logits), pairs, nll_scale)
    return LossOutput(per_pair, rewards_chosen, rewards_rejected, {"logits": logits})


#: What a loss trains on: ``pairs`` (chosen/rejected responses to one prompt: every loss but the ones below) or
#: ``unpaired`` (one response per example with a desirable/undesirable label, e.g. KTO: steps.losses.unpaired).
DATA_KINDS = ("pairs", "unpaired")


class PreferenceLoss:
    """A registered loss: subclasses set ``config_class`` (a dataclass) and ``requires_reference`` and write
    ``compute(pairs) -> LossOutput``. Calling the instance validates the inputs and returns that output.
    ``data_kind`` (one of DATA_KINDS) says which examples the trainer must feed it."""

    config_class: ClassVar[type]
    requires_reference: ClassVar[bool] = False
    data_kind: ClassVar[str] = "pairs"
    name: str = "<unregistered>"

    def __init__(self, config: Any) -> None:
        expected = type(self).config_class
        if not isinstance(config, expected):
            raise LossConfigError(
                "config", f"{type(self).__name__} needs a {expected.__name__}, got {type(config).__name__}"
            )
        self.config: Any = config

    def compute(self, pairs: PreferencePairs) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement compute(pairs)")

    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
        reference_chosen_logps: torch.Tensor | None = None,
        reference_rejected_logps: torch.Tensor | None = None,
    ) -> LossOutput:
        pairs = PreferencePairs(
            policy_chosen_logps,
            policy_rejected_logps,
            chosen_lengths,
            rejected_lengths,
            reference_chosen_logps,
            reference_rejected_logps,
        )
        if self.requires_reference and not pairs.has_reference:
            raise MissingReferenceError(
                f"loss {self.name!r} needs reference log-probs: pass reference_chosen_logps and "
                "reference_rejected_logps (sums from the frozen reference model or precomputed "
                "reference_score_chosen/rejected), or pick a reference-free loss"
            )
        out = self.compute(pairs)
        if out.per_pair.shape != (pairs.batch_size,):
            raise RuntimeError(
                f"{type(self).__name__}.compute returned per_pair of shape "
                f"{tuple(out.per_pair.shape)}, expected ({pairs.batch_size},)"
            )
        out.nll = pairs.chosen_nll
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config!r})"
