"""Preference losses by name: DPO, SimPO, ORPO, CPO, IPO, hinge (SLiC), and whatever else registers itself.

Every module in this package is imported here, so dropping a file with ``@register_loss("name")`` into
``steps/losses/`` makes ``get_loss("name")`` work without editing this file.

    loss_fn = get_loss("dpo", beta=0.1)
    out = loss_fn(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
                  reference_chosen_logps, reference_rejected_logps)
    out.loss.backward(); log(out.metrics)
"""

from steps.losses.base import (
    LossConfigError,
    LossInputError,
    LossOutput,
    LossTerms,
    MissingReferenceError,
    PreferenceLoss,
    PreferencePairs,
    UnknownLossError,
)
from steps.losses.registry import (
    LOSSES,
    DuplicateLossError,
    LossEntry,
    config_type_path,
    get_loss,
    import_loss_modules,
    loss_config_class,
    loss_from_config,
    register_loss,
    registered_losses,
    requires_reference,
    unregister_loss,
)

import_loss_modules(__name__)

__all__ = [
    "LOSSES",
    "DuplicateLossError",
    "LossConfigError",
    "LossEntry",
    "LossInputError",
    "LossOutput",
    "LossTerms",
    "MissingReferenceError",
    "PreferenceLoss",
    "PreferencePairs",
    "UnknownLossError",
    "config_type_path",
    "get_loss",
    "import_loss_modules",
    "loss_config_class",
    "loss_from_config",
    "register_loss",
    "registered_losses",
    "requires_reference",
    "unregister_loss",
]
