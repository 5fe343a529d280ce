"""KTO: Kahneman-Tversky Optimization from unpaired desirable/undesirable feedback (Ethayarajh et al. 2024,
arXiv:2402.01306), computed as TRL's KTOTrainer computes it (``loss_type="kto"``).

Differences from TRL, on purpose: the KL estimate may come from outside the batch (``kl=``: the trainer passes the
mean over every rank's KL rows, weighted by rows where TRL averages the per-rank means; the two agree for equal
batch sizes), and a batch without KL rows (one example and no outside estimate) uses KL = 0, where TRL refuses a
per-device batch size of 1. How the KL rows are formed and how losses are averaged over a step is the trainer's
(steps.train.unpaired)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steps.losses.base import LossConfigError, LossInputError
from steps.losses.registry import register_loss
from steps.losses.unpaired import UnpairedExamples, UnpairedLoss, UnpairedLossOutput
from steps.losses.validation import check_real


@dataclass(frozen=True)
class KTOConfig:
    """beta: inverse temperature of the implicit reward β(S − R) (TRL and the paper: 0.1); desirable_weight /
    undesirable_weight: λ_D and λ_U, the weights of the two kinds of example. The paper (eq. 8) advises
    λ_D·n_D / (λ_U·n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        check_real(self, "beta", minimum=0.0, min_inclusive=False, hint="inverse temperature, 0.1 is usual")
        check_real(self, "desirable_weight", minimum=0.0, hint="λ_D, weight of the desirable examples' losses")
        check_real(self, "undesirable_weight", minimum=0.0, hint="λ_U, weight of the undesirable examples' losses")
        if self.desirable_weight == 0.0 and self.undesirable_weight == 0.0:
            raise LossConfigError(
                "desirable_weight",
                "KTOConfig.desirable_weight and undesirable_weight are both 0: nothing would be learnt; "
                "set at least one above 0 (1.0 each is the default)",
            )


def kl_row_sums(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """[Σ_j (S(y'_j|x_j) − R(y'_j|x_j)), K] in fp64 and detached: what a trainer all-reduces over ranks before
    passing ``kl = sum / K`` (see :func:`kl_from_sums`)."""
    with torch.no_grad():
        diff = policy_kl_logps.detach().double() - reference_kl_logps.detach().double()
        return torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)])


def kl_from_sums(sums: torch.Tensor) -> torch.Tensor | None:
    """The mean KL-row log-ratio from (possibly all-reduced) :func:`kl_row_sums`; None when there were no rows."""
    return None if float(sums[1]) == 0.0 else (sums[0] / sums[1]).float()


@register_loss("kto")
class KTOLoss(UnpairedLoss):
    """r_i = S(y_i|x_i) − R(y_i|x_i);  KL = max(0, mean_j [S(y'_j|x_j) − R(y'_j|x_j)]) over the KL rows (detached;
    or the ``kl`` passed in, clamped the same way; 0 without either);
    ℓ_i = λ_D·(1 − σ(β(r_i − KL))) for a desirable example, λ_U·(1 − σ(β(KL − r_i))) for an undesirable one;
    loss = mean_i ℓ_i. Gradients flow through S(y_i|x_i) only.

    Rewards reported: β·r_i; reference point β·KL (``reward_accuracy`` counts rewards on the label's side of it).
    """

    config_class = KTOConfig
    requires_reference = True

    def compute_unpaired(self, examples: UnpairedExamples) -> UnpairedLossOutput:
        config: KTOConfig = self.config
        logratios = examples.logps - examples.reference_sums().detach()
        kl, rows = self._kl(examples)
        beta = config.beta
        desirable = config.desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))
        undesirable = config.undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))
        per_example = torch.where(examples.labels, desirable, undesirable)
        return UnpairedLossOutput(per_example, beta * logratios, examples.labels, kl, rows, reference_point=beta * kl)

    @staticmethod
    def _kl(examples: UnpairedExamples) -> tuple[torch.Tensor, int]:
        """(the clamped, detached KL estimate, KL rows it came from in this batch)."""
        zero = examples.logps.new_zeros(())
        if examples.kl is not None:
            return examples.kl.detach().reshape(()).to(zero.dtype).clamp(min=0.0), 0
        if examples.kl_logps is None or examples.reference_kl_logps is None:
            raise LossInputError(
                "KTO needs KL rows (policy_kl_logps and reference_kl_logps: each prompt scored with another "
                "example's completion; an empty tensor when there are none) or a kl estimate"
            )
        if examples.kl_rows == 0:
            return zero, 0
        with torch.no_grad():
            kl = (examples.kl_logps - examples.reference_kl_logps).mean().clamp(min=0.0)
        return kl.detach(), examples.kl_rows
