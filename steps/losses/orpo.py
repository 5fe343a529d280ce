"""ORPO: Monolithic Preference Optimization without Reference Model (Hong et al. 2024, arXiv:2403.07691):
SFT NLL plus λ times an odds-ratio penalty on per-token mean log-probs (λ is ``orpo_lambda``, applied as in the
paper)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from steps.losses.base import LossOutput, PreferenceLoss, PreferencePairs, with_nll
from steps.losses.registry import register_loss
from steps.losses.validation import check_real

# Mean log-probs are clamped to at most this before the odds are taken. At A = 0 the odds e^A/(1 − e^A) are
# infinite (log(1 − e^A) = −inf, and the gradient becomes 0·inf = NaN). A fp32 log-softmax cannot resolve
# token probabilities closer to 1 than about 1e-7 per token anyway, so mean log-probs in (−1e-6, 0] carry
# no information; clamping there caps the log-odds at ≈ 13.8 and keeps loss and gradient finite.
MAX_MEAN_LOGP = -1e-6


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) for p = exp(A), computed as A − log(−expm1(A)) with A clamped to ≤ MAX_MEAN_LOGP."""
    clamped = mean_logps.clamp(max=MAX_MEAN_LOGP)
    return clamped - torch.log(-torch.expm1(clamped))


@dataclass(frozen=True)
class ORPOConfig:
    """orpo_lambda: weight λ of the odds-ratio term; nll_scale: weight of the chosen per-token NLL (the SFT
    term)."""

    orpo_lambda: float = 0.1
    nll_scale: float = 1.0

    def __post_init__(self) -> None:
        check_real(self, "orpo_lambda", minimum=0.0, hint="weight of the odds-ratio term; the paper uses 0.1")
        check_real(self, "nll_scale", minimum=0.0)


@register_loss("orpo")
class ORPOLoss(PreferenceLoss):
    """log_odds = (A_w − A_l) − [log(1 − e^{A_w}) − log(1 − e^{A_l})],  A = S/|y| (clamped ≤ −1e-6);
    ℓ = nll_scale·NLL − λ·log σ(log_odds),  NLL = −A(y_w).

    Rewards reported: A (the per-token mean log-prob) per response. Extra metrics: ``log_odds`` and
    ``odds_ratio_loss`` = −log σ(log_odds) before λ.
    """

    config_class = ORPOConfig
    requires_reference = False

    def compute(self, pairs: PreferencePairs) -> LossOutput:
        config: ORPOConfig = self.config
        chosen = pairs.chosen_mean_logps
        rejected = pairs.rejected_mean_logps
        ratio = log_odds(chosen) - log_odds(rejected)
        odds_ratio_loss = -F.logsigmoid(ratio)
        per_pair = with_nll(config.orpo_lambda * odds_ratio_loss, pairs, config.nll_scale)
        return LossOutput(per_pair, chosen, rejected, {"log_odds": ratio, "odds_ratio_loss": odds_ratio_loss})
