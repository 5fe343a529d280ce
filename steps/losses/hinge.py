"""Hinge preference loss of SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with
Human Feedback", arXiv:2305.10425), on reference-relative log-ratios as in DPO."""

from dataclasses import dataclass

import torch

from steps.losses.base import LossOutput, PreferenceLoss, PreferencePairs
from steps.losses.registry import register_loss
from steps.losses.validation import check_real


@dataclass(frozen=True)
class HingeConfig:
    """beta: scale of the log-ratio margin; the hinge is flat once β·margin ≥ 1 (margin 1/β)."""

    beta: float = 0.1

    def __post_init__(self) -> None:
        check_real(self, "beta", minimum=0.0, min_inclusive=False, hint="the hinge closes at margin 1/beta")


@register_loss("hinge")
class HingeLoss(PreferenceLoss):
    """z = β[(S_w − R_w) − (S_l − R_l)];  ℓ = max(0, 1 − z).

    Rewards reported: β(S − R) per response. Extra metric: ``logits`` = z.
    """

    config_class = HingeConfig
    requires_reference = True

    def compute(self, pairs: PreferencePairs) -> LossOutput:
        config: HingeConfig = self.config
        ref_chosen, ref_rejected = pairs.reference_sums()
        rewards_chosen = config.beta * (pairs.chosen_logps - ref_chosen)
        rewards_rejected = config.beta * (pairs.rejected_logps - ref_rejected)
        logits = rewards_chosen - rewards_rejected
        per_pair = torch.relu(1.0 - logits)
        return LossOutput(per_pair, rewards_chosen, rewards_rejected, {"logits": logits})
