"""IPO: Identity Preference Optimisation, the ΨPO objective with Ψ = identity (Azar et al. 2023,
"A General Theoretical Paradigm to Understand Learning from Human Preferences", arXiv:2310.12036)."""

from dataclasses import dataclass

from steps.losses.base import LossOutput, PreferenceLoss, PreferencePairs
from steps.losses.registry import register_loss
from steps.losses.validation import check_real


@dataclass(frozen=True)
class IPOConfig:
    """beta: regularisation strength τ; the log-ratio margin h is regressed onto 1/(2β)."""

    beta: float = 0.1

    def __post_init__(self) -> None:
        check_real(self, "beta", minimum=0.0, min_inclusive=False, hint="target margin is 1/(2·beta)")


@register_loss("ipo")
class IPOLoss(PreferenceLoss):
    """h = (A_w − RA_w) − (A_l − RA_l)  (per-token means, A = S/|y|, RA = R/|y|);  ℓ = (h − 1/(2β))².

    Rewards reported: β(A − RA) per response, so reward_margin = β·mean(h), whose target is 0.5.
    Extra metric: ``logits`` = h.
    """

    config_class = IPOConfig
    requires_reference = True

    def compute(self, pairs: PreferencePairs) -> LossOutput:
        config: IPOConfig = self.config
        ref_chosen, ref_rejected = pairs.reference_means()
        chosen_ratio = pairs.chosen_mean_logps - ref_chosen
        rejected_ratio = pairs.rejected_mean_logps - ref_rejected
        margin = chosen_ratio - rejected_ratio
        per_pair = (margin - 1.0 / (2.0 * config.beta)) ** 2
        return LossOutput(per_pair, config.beta * chosen_ratio, config.beta * rejected_ratio, {"logits": margin})
