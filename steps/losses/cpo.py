"""CPO: Contrastive Preference Optimization (Xu et al. 2024, arXiv:2401.08417): a reference-free DPO on
summed log-probs plus a behaviour-cloning NLL term on the chosen response."""

from dataclasses import dataclass

from steps.losses.base import LossOutput, PreferenceLoss, PreferencePairs, logistic_loss
from steps.losses.registry import register_loss
from steps.losses.validation import check_real


@dataclass(frozen=True)
class CPOConfig:
    """beta: scale of the summed log-prob difference; nll_scale: weight of the chosen per-token NLL."""

    beta: float = 0.1
    nll_scale: float = 1.0

    def __post_init__(self) -> None:
        check_real(self, "beta", minimum=0.0, min_inclusive=False)
        check_real(self, "nll_scale", minimum=0.0)


@register_loss("cpo")
class CPOLoss(PreferenceLoss):
    """z = β(S_w − S_l);  ℓ = −log σ(z) + nll_scale·NLL,  NLL = −A(y_w) = −S(y_w)/|y_w|.

    Rewards reported: β·S per response. Extra metric: ``logits`` = z.
    """

    config_class = CPOConfig
    requires_reference = False

    def compute(self, pairs: PreferencePairs) -> LossOutput:
        config: CPOConfig = self.config
        beta = config.beta
        return logistic_loss(pairs, beta * pairs.chosen_logps, beta * pairs.rejected_logps, nll_scale=config.nll_scale)
