"""Which variants of a run train in on-policy rounds, and the rules ``preference.on_policy`` must meet for the run
as a whole (checked once, when the run is planned; errors name the field)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from steps.config.convert import ConfigError

if TYPE_CHECKING:
    from steps.config.plan import VariantPlan
    from steps.config.schema import RunConfig

SECTION = "preference.on_policy"


def runs_rounds(plan: VariantPlan) -> bool:
    """True for a variant that trains in on-policy rounds: a pair loss (not SFT, not an unpaired loss such as KTO)
    whose resolved preference section has ``on_policy.enabled``."""
    from steps import losses

    if plan.loss == "sft" or not plan.config.preference.on_policy.enabled:
        return False
    return losses.data_kind(plan.loss) == "pairs"


def _fail(cfg: RunConfig, name: str, message: str) -> ConfigError:
    return ConfigError(cfg.source, f"{SECTION}.{name}", message)


def check_rounds(cfg: RunConfig, plans: list[VariantPlan]) -> None:
    """The run-level rules of the variants that run rounds (none: nothing to check): one node per round, an SFT
    model where the reference is the SFT model, a prompts file that exists, a judge that exists."""
    rounds = [p for p in plans if runs_rounds(p)]
    if not rounds:
        return
    if cfg.resources.num_nodes > 1:
        raise _fail(
            cfg,
            "enabled",
            f"on-policy rounds train on one node (resources.num_nodes is {cfg.resources.num_nodes}); use "
            "resources.nproc_per_node for several GPUs of one machine, or disable on_policy",
        )
    for plan in rounds:
        section = plan.config.preference.on_policy
        if section.reference == "sft" and not cfg.sft.enabled:
            raise _fail(cfg, "reference", f"is 'sft' for {plan.name} but sft.enabled is false; use round_start")
        if section.prompts != "train" and not Path(section.prompts).expanduser().is_file():
            raise _fail(cfg, "prompts", f"{section.prompts}: no such file; give a JSONL file of training prompts")
        if section.reward_model_spec is None:
            from steps.evaluate.judges import JudgeError
            from steps.evaluate.judges.registry import judge_class

            try:
                judge_class(section.judge)
            except JudgeError as exc:
                raise _fail(cfg, "judge", f"{exc} (or reward_model:<model spec>)") from None
