"""The ``deployment`` section of a run config, read without the rest (flows/report.py's Config parser).

The report flow only needs the project name to join PrefFlow's ``@project``; parsing the whole run
config would validate the loss configs, which imports torch at every launch of a flow that never
trains. The rules here are the run config's own (steps.config.DeploymentConfig).
"""
from __future__ import annotations

import dataclasses
import re

from steps.config import ConfigError, DeploymentConfig, parse_yaml_text

#: Metaflow's rule for @project names.
PROJECT_NAME = re.compile(r"^[a-z0-9_]+$")


def parse_deployment_text(text: str, source: str = "config") -> dict:
    """YAML run config -> ``{"deployment": {...}}`` with the section's defaults filled in and checked."""
    raw = parse_yaml_text(text, source)
    section = raw.get("deployment") or {}
    if not isinstance(section, dict):
        raise ConfigError(source, "deployment", f"got {section!r}; expected a mapping")
    allowed = [f.name for f in dataclasses.fields(DeploymentConfig)]
    for key, value in section.items():
        if key not in allowed:
            raise ConfigError(source, f"deployment.{key}", f"unknown key; allowed keys: {', '.join(allowed)}")
        if value is not None and not isinstance(value, str):
            raise ConfigError(source, f"deployment.{key}", f"got {value!r}; expected a string")
    deployment = DeploymentConfig(**section)
    if not deployment.project or not PROJECT_NAME.match(deployment.project):
        raise ConfigError(source, "deployment.project",
                          f"got {deployment.project!r}; use lowercase letters, digits and underscores")
    cron = deployment.schedule_cron
    if cron is not None and len(cron.split()) != 6:
        raise ConfigError(source, "deployment.schedule_cron",
                          f"got {cron!r}; use the 6-field AWS form, e.g. '0 3 * * ? *'")
    return {"deployment": dataclasses.asdict(deployment)}
