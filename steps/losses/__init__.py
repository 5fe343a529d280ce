"""Preference losses by name: DPO, SimPO, ORPO, CPO, IPO, hinge (SLiC), KTO (unpaired feedback: ``data_kind``),
and whatever else registers itself.
Every module here is imported, so a file with ``@register_loss("name")`` dropped into ``steps/losses/`` makes
``build_loss("name")`` work: ``out = build_loss("dpo", beta=0.1)(chosen, rejected, ...); out.loss.backward()``."""

from steps.losses.base import (
    DATA_KINDS,
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
    data_kind,
    import_loss_modules,
    loss_class,
    register_loss,
    registered_losses,
    requires_reference,
)
from steps.losses.unpaired import UnpairedExamples, UnpairedLoss, UnpairedLossOutput

import_loss_modules(__name__)

__all__ = [
    "DATA_KINDS",
    "DuplicateLossError",
    "LossConfigError",
    "LossInputError",
    "LossOutput",
    "MissingReferenceError",
    "PreferenceLoss",
    "PreferencePairs",
    "UnknownLossError",
    "UnpairedExamples",
    "UnpairedLoss",
    "UnpairedLossOutput",
    "build_loss",
    "data_kind",
    "import_loss_modules",
    "loss_class",
    "register_loss",
    "registered_losses",
    "requires_reference",
]
