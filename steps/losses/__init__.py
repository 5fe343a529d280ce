"""Preference losses by name: DPO, SimPO, ORPO, CPO, IPO, hinge (SLiC), and whatever else registers itself.
Every module here is imported, so a file with ``@register_loss("name")`` dropped into ``steps/losses/`` makes
``build_loss("name")`` work: ``out = build_loss("dpo", beta=0.1)(chosen, rejected, ...); out.loss.backward()``."""

from steps.losses.base import (
    Fairseq2Names,
    LossConfigError,
    LossInputError,
    LossOutput,
    MissingReferenceError,
    PreferenceLoss,
    PreferencePairs,
    UnknownLossError,
)
from steps.losses.registry import (
    DuplicateLossError,
    build_loss,
    fairseq2_names,
    import_loss_modules,
    loss_class,
    loss_for_type,
    register_loss,
    registered_losses,
    requires_reference,
)

import_loss_modules(__name__)

__all__ = [
    "DuplicateLossError",
    "Fairseq2Names",
    "LossConfigError",
    "LossInputError",
    "LossOutput",
    "MissingReferenceError",
    "PreferenceLoss",
    "PreferencePairs",
    "UnknownLossError",
    "build_loss",
    "fairseq2_names",
    "import_loss_modules",
    "loss_class",
    "loss_for_type",
    "register_loss",
    "registered_losses",
    "requires_reference",
]
