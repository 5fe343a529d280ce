"""The run plan made in ``start``: the losses, and one variant per foreach branch with its resolved config."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from steps.config.convert import ConfigError, did_you_mean
from steps.config.loading import config_from_dict
from steps.config.overrides import blame_overrides, parse_overrides
from steps.config.schema import DataConfig, RunConfig
from steps.config.sweeps import read_sweep
from steps.config.training import resolve_preference

SFT = "sft"
DATA_FORMATS: tuple[str, ...] = typing.get_args(typing.get_type_hints(DataConfig)["format"])


@dataclass(frozen=True)
class Variant:
    """One branch of the flow's foreach: its name (directory, table row), loss ("sft" or registered) and the
    preference keys a sweep point sets on top of ``per_loss[loss]`` (dotted for criterion_config)."""

    name: str
    loss: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain values, for artifacts read without this package (the report)."""
        return {"name": self.name, "loss": self.loss, "overrides": dict(self.overrides)}


@dataclass(frozen=True)
class VariantPlan:
    """A variant and the run config it trains with: ``config.preference`` is resolved for its loss."""

    variant: Variant
    config: RunConfig

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def loss(self) -> str:
        return self.variant.loss


@dataclass(frozen=True)
class RunPlan:
    config: RunConfig
    losses: list[str]
    variants: list[VariantPlan]


def parse_losses(text: str | None, cfg: RunConfig) -> list[str]:
    """``--loss dpo,simpo`` -> ["dpo", "simpo"]; "sft" means SFT only; empty -> the config's criterion."""
    from steps import losses

    if not text:
        return [cfg.preference.criterion]
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == [SFT]:
        return []
    registered = losses.registered_losses()
    for name in names:
        if name not in registered:
            raise ConfigError(
                "--loss",
                name,
                f"unknown loss{did_you_mean(name, registered)}; registered: "
                f"{', '.join(registered)} (or 'sft' for SFT only)",
            )
    if len(set(names)) != len(names):
        raise ConfigError("--loss", text, "a loss is listed twice")
    return names


def for_loss(cfg: RunConfig, loss: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """``cfg`` with its preference section resolved for ``loss`` (per_loss and ``overrides`` merged)."""
    try:
        return dataclasses.replace(cfg, preference=resolve_preference(cfg.preference, loss, overrides))
    except ConfigError as exc:
        raise exc.within("preference").located(cfg.source) from None


def _per_loss(cfg: RunConfig) -> dict[str, RunConfig]:
    """Every ``per_loss`` entry resolved, once: the runs that train it take it from here; errors name the entry."""
    resolved = {}
    for loss in cfg.preference.per_loss:
        try:
            resolved[loss] = dataclasses.replace(cfg, preference=resolve_preference(cfg.preference, loss))
        except ConfigError as exc:
            raise exc.within(f"preference.per_loss.{loss}").located(cfg.source) from None
    return resolved


def check_data_kinds(cfg: RunConfig, plans: list[VariantPlan]) -> None:
    """Every loss can train on the data's format: a pairwise loss needs pairs, which ``data.format: unpaired``
    (prompt/completion/label rows) does not have; an unpaired loss (KTO) trains on any format (pairs are split into a
    desirable and an undesirable example)."""
    from steps import losses

    if cfg.data.format != "unpaired":
        return
    pairwise = sorted({p.loss for p in plans if p.loss != SFT and losses.data_kind(p.loss) == "pairs"})
    if pairwise:
        unpaired = [name for name in losses.registered_losses() if losses.data_kind(name) == "unpaired"]
        raise ConfigError(
            cfg.source,
            "data.format",
            f"is 'unpaired' (single answers labelled desirable/undesirable, no pairs), but {', '.join(pairwise)} "
            f"trains on preference pairs: train an unpaired loss instead (--loss {','.join(unpaired)}), or set "
            f"data.format to a pair format ({', '.join(f for f in DATA_FORMATS if f != 'unpaired')})",
        )


def plan_variants(cfg: RunConfig, loss_arg: str = "", sweep_path: str = "") -> RunPlan:
    """The variants a run trains: SFT (when enabled), each ``--loss``, each sweep point; each one resolved."""
    per_loss = _per_loss(cfg)
    losses = parse_losses(loss_arg, cfg) if (loss_arg or not sweep_path) else []
    if losses and not cfg.sft.enabled and cfg.preference.init == SFT:
        raise ConfigError(cfg.source, "preference.init", "is 'sft' but sft.enabled is false")
    plans = [VariantPlan(Variant(SFT, SFT), cfg)] if cfg.sft.enabled else []
    plans += [VariantPlan(Variant(name, name), per_loss.get(name) or for_loss(cfg, name)) for name in losses]
    for plan in plans[1 if cfg.sft.enabled else 0 :]:
        for key in ("init", "reference"):
            if not cfg.sft.enabled and getattr(plan.config.preference, key) == SFT:
                raise ConfigError(cfg.source, f"preference.{key}", f"is 'sft' for {plan.name} but sft.enabled is false")
    if sweep_path:
        sweep = read_sweep(sweep_path)
        for name, overrides in sweep.points:
            try:
                plans.append(VariantPlan(Variant(name, sweep.loss, overrides), for_loss(cfg, sweep.loss, overrides)))
            except ConfigError as exc:
                raise ConfigError(sweep.source, "grid", f"point {name!r}: {exc.key}: {exc.message}") from None
    check_data_kinds(cfg, plans)
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ConfigError("--sweep", sweep_path, f"variant names collide: {names}")
    if not plans:
        raise ConfigError("--loss", loss_arg, "nothing to train: SFT is disabled and no preference loss was given")
    from steps.onpolicy.planning import check_rounds

    check_rounds(cfg, plans)
    return RunPlan(cfg, losses, plans)


def load_plan(data: Mapping, source: str, set_arg: str = "", loss_arg: str = "", sweep_path: str = "") -> RunPlan:
    """The whole check of a run, from the config mapping and the flow's parameters (the preflight, or ``start``
    when the preflight did not run): the config typed once, then planned."""
    overrides = parse_overrides(set_arg)
    cfg = config_from_dict(data, source, overrides)
    try:
        return plan_variants(cfg, loss_arg, sweep_path)
    except ConfigError as exc:
        raise blame_overrides(exc, overrides) from None
