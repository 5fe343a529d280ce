"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024, arXiv:2405.14734)."""

from dataclasses import dataclass

from steps.losses.base import LossOutput, PreferenceLoss, PreferencePairs, logistic_loss
from steps.losses.registry import register_loss
from steps.losses.validation import check_real


@dataclass(frozen=True)
class SimPOConfig:
    """beta: reward scale on the per-token mean log-prob; gamma: target reward margin, subtracted from the
    logit as written in the paper (z = βΔA − γ). Our gamma IS the paper's γ, not γ/β: the SimPO reference
    code's ``gamma_beta_ratio`` r corresponds to gamma = r·β here. nll_scale: weight of the chosen NLL."""

    beta: float = 1.0
    gamma: float = 0.5
    nll_scale: float = 0.0

    def __post_init__(self) -> None:
        check_real(self, "beta", minimum=0.0, min_inclusive=False, hint="reward scale; the paper uses 2 to 10")
        check_real(self, "gamma", hint="target margin γ as in the paper, not γ/β")
        check_real(self, "nll_scale", minimum=0.0)


@register_loss("simpo")
class SimPOLoss(PreferenceLoss):
    """z = β(A_w − A_l) − γ;  ℓ = −log σ(z) + nll_scale·NLL,  A = S/|y|, NLL = −A(y_w).

    Rewards reported: β·A per response (SimPO's implicit reward; γ is not in them). Extra metric:
    ``logits`` = z (so reward_margin − gamma = mean logits).
    """

    config_class = SimPOConfig
    requires_reference = False

    def compute(self, pairs: PreferencePairs) -> LossOutput:
        config: SimPOConfig = self.config
        beta = config.beta
        return logistic_loss(
            pairs,
            beta * pairs.chosen_mean_logps,
            beta * pairs.rejected_mean_logps,
            margin=config.gamma,
            nll_scale=config.nll_scale,
        )
