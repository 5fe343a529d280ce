"""Reading run configs: file -> YAML mapping -> typed RunConfig (Metaflow's Config parsers included)."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

from steps.config.convert import ConfigError, build, from_dict, to_dict
from steps.config.fairseq2_losses import plain_config
from steps.config.overrides import apply_overrides, blame_overrides
from steps.config.schema import SECTIONS, RunConfig

#: The embedded default run config (what the flow uses without ``--config config FILE``).
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
#: Where errors found by Metaflow's Config parser point: it is handed the text, not the file name.
METAFLOW_SOURCE = "config"


def read_config_text(path: str | PathLike) -> str:
    """The text of a YAML file; ConfigError (naming the file) when it is missing, a directory or not UTF-8."""
    source = str(path)
    path = Path(path)
    if not path.exists():
        raise ConfigError(source, "", "file not found; pass an existing YAML file (see configs/)")
    if path.is_dir():
        raise ConfigError(source, "", "is a directory; pass a YAML file (see configs/)")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            source, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save the file as UTF-8"
        ) from None


def parse_yaml_text(text: str, source: str = "<config>") -> dict:
    """YAML text -> the mapping of sections; ConfigError for bad YAML or a list/scalar document."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, "", f"not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            source,
            "",
            f"expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__} {data!r:.60}",
        )
    return data


def config_from_dict(data: Mapping, source: str = "<dict>", overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The typed, checked run config from a YAML mapping plus ``--set`` overrides (errors blame the override).

    fairseq2's shape of the preference section is translated to PrefFlow's here, before typing
    (steps.config.fairseq2_losses); nothing after this sees fairseq2's names.
    """
    overrides = overrides or {}
    try:
        data = plain_config(apply_overrides(data, overrides))
        return build(RunConfig, data, extra={"source": source})
    except ConfigError as exc:
        raise blame_overrides(exc.located(source), overrides) from None


def load_config(path: str | PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    path = path or DEFAULT_CONFIG_PATH
    return config_from_dict(parse_yaml_text(read_config_text(path), str(path)), str(path), overrides)


def load_section(data: Mapping, name: str, source: str = METAFLOW_SOURCE) -> Any:
    """One typed section of a config mapping (defaults filled in), without typing the rest."""
    if name not in SECTIONS:
        raise KeyError(f"no config section {name!r}; sections: {', '.join(SECTIONS)}")
    if name == "preference":
        data = plain_config(data)
    return from_dict(typing.get_type_hints(RunConfig)[name], data.get(name), source, name)


def parse_config_text(text: str) -> dict:
    """Metaflow ``Config`` parser of flows/pipeline.py: the mapping as written, YAML syntax checked and nothing else.

    The command-line preflight checks the whole config before Metaflow starts; a run started without it (Argo,
    Kubernetes, ``step``) is checked once, in ``start`` (steps.config.checked_plan).
    """
    return parse_yaml_text(text, METAFLOW_SOURCE)


def parse_deployment_text(text: str) -> dict:
    """Metaflow ``Config`` parser of flows/report.py: only the deployment section, typed and filled in.

    Typing the whole run config would import torch (the loss registry) in a flow that never trains.
    """
    return {"deployment": to_dict(load_section(parse_yaml_text(text, METAFLOW_SOURCE), "deployment"))}
