"""Run configuration: YAML typed once into sections, checked by one layer, planned per variant.
Modules: schema (sections, rules), training (sft, preference), convert (YAML <-> dataclasses), loading, overrides
(``--set``), sweeps, plan (variants), preflight (the command-line check before Metaflow starts), checked_plan (its
plan handed to ``start``), fairseq2_losses / fairseq2_names (fairseq2's spelling, translated at load) and the
fairseq2 recipe import (``python -m steps.config from-fairseq2``)."""

from steps.config.checked_plan import plan_for_start
from steps.config.convert import ConfigError
from steps.config.convert import to_dict as config_to_dict
from steps.config.loading import (
    DEFAULT_CONFIG_PATH,
    config_from_dict,
    load_config,
    load_section,
    parse_config_text,
    parse_deployment_text,
    parse_yaml_text,
    read_config_text,
)
from steps.config.overrides import parse_overrides
from steps.config.plan import RunPlan, Variant, VariantPlan, for_loss, load_plan, parse_losses, plan_variants
from steps.config.preflight import ensure_user_name, preflight
from steps.config.schema import (
    DataConfig,
    DeploymentConfig,
    EvaluationConfig,
    IFBenchConfig,
    ModelConfig,
    ResourcesConfig,
    RunConfig,
    StepResources,
)
from steps.config.sweeps import Sweep, read_sweep
from steps.config.training import LoraConfig, PreferenceConfig, SFTConfig, TrainConfig, resolve_preference

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "DataConfig",
    "DeploymentConfig",
    "EvaluationConfig",
    "IFBenchConfig",
    "LoraConfig",
    "ModelConfig",
    "PreferenceConfig",
    "ResourcesConfig",
    "RunConfig",
    "RunPlan",
    "SFTConfig",
    "StepResources",
    "Sweep",
    "TrainConfig",
    "Variant",
    "VariantPlan",
    "config_from_dict",
    "config_to_dict",
    "ensure_user_name",
    "for_loss",
    "load_config",
    "load_plan",
    "load_section",
    "parse_config_text",
    "parse_deployment_text",
    "parse_losses",
    "parse_overrides",
    "parse_yaml_text",
    "plan_for_start",
    "plan_variants",
    "preflight",
    "read_config_text",
    "read_sweep",
    "resolve_preference",
]
