"""DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), with the conservative
label smoothing of Mitchell (2023, "A note on DPO with noisy preferences") and an optional NLL term."""

from dataclasses import dataclass

import torch.nn.functional as F

from steps.losses.base import LossOutput, PreferenceLoss, PreferencePairs, with_nll
from steps.losses.registry import register_loss
from steps.losses.validation import check_bool, check_real


@dataclass(frozen=True)
class DPOConfig:
    """beta: inverse temperature of the implicit reward; nll_scale: weight of the chosen per-token NLL;
    label_smoothing: assumed probability ε that a preference label is flipped; length_normalization: use
    per-token means A = S/|y| (and RA = R/|y|) instead of sums."""

    beta: float = 0.1
    nll_scale: float = 0.0
    label_smoothing: float = 0.0
    length_normalization: bool = False

    def __post_init__(self) -> None:
        check_real(self, "beta", minimum=0.0, min_inclusive=False, hint="inverse temperature, 0.1 is usual")
        check_real(self, "nll_scale", minimum=0.0)
        check_real(
            self,
            "label_smoothing",
            minimum=0.0,
            maximum=0.5,
            max_inclusive=False,
            hint="probability that a label is flipped; 0 is plain DPO",
        )
        check_bool(self, "length_normalization")


@register_loss("dpo")
class DPOLoss(PreferenceLoss):
    """z = β[(S_w − R_w) − (S_l − R_l)]  (A and RA in place of S and R when length_normalization);
    ℓ = −(1−ε)·log σ(z) − ε·log σ(−z) + nll_scale·NLL,  NLL = −A(y_w).

    Rewards reported: β(S − R) per response (β(A − RA) with length_normalization). Extra metric: ``logits`` = z.
    """

    config_class = DPOConfig
    requires_reference = True

    def compute(self, pairs: PreferencePairs) -> LossOutput:
        config: DPOConfig = self.config
        if config.length_normalization:
            chosen, rejected = pairs.chosen_mean_logps, pairs.rejected_mean_logps
            ref_chosen, ref_rejected = pairs.reference_means()
        else:
            chosen, rejected = pairs.chosen_logps, pairs.rejected_logps
            ref_chosen, ref_rejected = pairs.reference_sums()
        rewards_chosen = config.beta * (chosen - ref_chosen)
        rewards_rejected = config.beta * (rejected - ref_rejected)
        logits = rewards_chosen - rewards_rejected
        smoothing = config.label_smoothing
        per_pair = -(1.0 - smoothing) * F.logsigmoid(logits)
        if smoothing > 0.0:
            per_pair = per_pair - smoothing * F.logsigmoid(-logits)
        per_pair = with_nll(per_pair, pairs, config.nll_scale)
        return LossOutput(per_pair, rewards_chosen, rewards_rejected, {"logits": logits})
