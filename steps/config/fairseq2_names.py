"""fairseq2's names in PrefFlow configs: model asset names -> Hugging Face ids, checkpoint names -> the SFT model,
and ``criterion_config`` mappings typed with fairseq2's class paths (aliases of the loss configs, looked up through
the loss registry: each loss config's ``fairseq2`` attribute says how fairseq2 spells it)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from steps.config.convert import ConfigError, did_you_mean, join_key, note, short, yaml_fields

#: fairseq2's model asset cards (fairseq2/assets/cards/models/llama.yaml) and the Hugging Face repositories of the
#: same weights.
MODEL_IDS = {
    "llama2_7b": "meta-llama/Llama-2-7b-hf",
    "llama2_7b_chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama2_13b": "meta-llama/Llama-2-13b-hf",
    "llama2_13b_chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama2_70b": "meta-llama/Llama-2-70b-hf",
    "llama2_70b_chat": "meta-llama/Llama-2-70b-chat-hf",
    "llama3_8b": "meta-llama/Meta-Llama-3-8B",
    "llama3_8b_instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3_70b": "meta-llama/Meta-Llama-3-70B",
    "llama3_70b_instruct": "meta-llama/Meta-Llama-3-70B-Instruct",
    "llama3_1_8b": "meta-llama/Llama-3.1-8B",
    "llama3_1_8b_instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3_1_70b": "meta-llama/Llama-3.1-70B",
    "llama3_1_70b_instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama3_2_1b": "meta-llama/Llama-3.2-1B",
    "llama3_2_1b_instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3_2_3b": "meta-llama/Llama-3.2-3B",
    "llama3_2_3b_instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3_3_70b_instruct": "meta-llama/Llama-3.3-70B-Instruct",
    "r1_distilled_llama3_1_8b_instruct": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
}
#: fairseq2's names for a checkpoint of the run before (the SFT run, in the guide's recipes).
CHECKPOINT_NAME = re.compile(r"^(checkpoint_step_\d+|last_checkpoint)$")
#: The spec of the SFT model in ``preference.init`` / ``preference.reference``.
SFT = "sft"


def model_spec(value: Any, key: str) -> tuple[str, str]:
    """(PrefFlow model spec, what was done) for a fairseq2 model reference: an asset name, ``{name: ...}`` (2025),
    a checkpoint name (the SFT model, ``sft``), or a Hugging Face id / local path (kept)."""
    if isinstance(value, Mapping):
        if "name" not in value:
            raise ConfigError("", key, f"got {short(value)}; expected a model name or {{name: ...}}")
        value = value["name"]
        key = join_key(key, "name")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("", key, f"got {short(value)}; expected a fairseq2 model name (e.g. llama3_1_8b)")
    name = value.strip()
    if CHECKPOINT_NAME.match(name):
        return SFT, (
            f"{name!r} is a checkpoint of fairseq2's SFT run: here the SFT model this run trains first ('sft')"
        )
    if name.split("@")[0] in MODEL_IDS:  # llama3_1_8b@user: a user's own card for the same weights
        hf_id = MODEL_IDS[name.split("@")[0]]
        return hf_id, f"fairseq2 asset {name!r} is Hugging Face {hf_id!r}"
    if "/" in name or name.startswith((".", "~")):
        return name, f"{name!r} is kept as a model spec (a Hugging Face id or a local Hugging Face directory)"
    raise ConfigError(
        "",
        key,
        f"fairseq2 model {name!r} has no known Hugging Face id{did_you_mean(name, MODEL_IDS)}; known: "
        f"{', '.join(MODEL_IDS)}, checkpoint_step_N; or give a Hugging Face id",
    )


@dataclass
class CriterionFields:
    """A ``criterion_config`` mapping read for one loss: ``fields`` of its config class, ``section`` keys of the
    preference section that fairseq2-only fields set ({section key: (fairseq2 field, value)}), ``notes``
    ((key, message) pairs to log) and whether ``_type_`` named a fairseq2 class."""

    cls: type
    fields: dict[str, Any] = field(default_factory=dict)
    section: dict[str, tuple[str, Any]] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)
    fairseq2: bool = False


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def read_criterion_config(criterion: str, raw: Any, key: str = "criterion_config", defaults: bool = True) -> Any:
    """``raw`` (a mapping, optionally with ``_type_``: PrefFlow's class path or fairseq2's) read for ``criterion``.

    With a fairseq2 ``_type_`` and ``defaults``, fields left out take fairseq2's defaults (the same YAML means the
    same training); fairseq2-only fields are mapped (``reference_model``) or accepted with a note (``no_effect``).
    Errors are ConfigErrors at ``key`` (relative to the preference section).
    """
    from steps import losses

    cls = losses.loss_class(criterion).config_class
    names = losses.fairseq2_names(criterion)
    out = CriterionFields(cls)
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        raise ConfigError("", key, f"got {short(raw)}; expected a mapping of {cls.__name__} fields")
    raw = dict(raw)
    type_path = raw.pop("_type_", None)
    if type_path is not None and type_path not in (_path(cls), cls.__qualname__):
        out.fairseq2 = isinstance(type_path, str) and names is not None and names.names_type(type_path)
        if not out.fairseq2:
            other = losses.loss_for_type(type_path) if isinstance(type_path, str) else None
            hint = f" (it names the config of {other!r})" if other else ""
            aliases = f", fairseq2's {' / '.join(names.class_names)}" if names else ""
            raise ConfigError(
                "",
                join_key(key, "_type_"),
                f"got {short(type_path)}, which does not match criterion {criterion!r}{hint}; use "
                f"{_path(cls)!r}{aliases} or omit _type_",
            )
    own = yaml_fields(cls)
    extra = names.fields if names else ()
    for name, value in raw.items():
        where = join_key(key, str(name))
        if name in own:
            out.fields[name] = value
            if out.fairseq2 and names and name in names.changed:
                out.notes.append((where, names.changed[name]))
        elif names and name in names.section_fields:
            out.section[names.section_fields[name]] = (name, value)
        elif names and name in names.no_effect:
            out.notes.append((where, f"fairseq2-only, no effect here: {names.no_effect[name]}"))
        else:
            allowed = [*own, *extra]
            raise ConfigError(
                "", where, f"unknown key{did_you_mean(str(name), allowed)}; allowed keys: {', '.join(allowed)}"
            )
    if out.fairseq2 and defaults and names:
        filled = {k: v for k, v in names.defaults.items() if k not in out.fields}
        out.fields.update(filled)
        ours = {f.name: f.default for f in dataclasses.fields(cls)}
        differ = [f"{k}={v!r} (PrefFlow's default {ours[k]!r})" for k, v in filled.items() if ours.get(k) != v]
        if differ:
            out.notes.append((key, f"fairseq2's defaults for the fields left out: {', '.join(differ)}"))
    return out


def reference_spec(fairseq2_field: str, value: Any, key: str) -> tuple[str, str]:
    """The preference section's ``reference`` for fairseq2's ``reference_model`` (null: scores in the data)."""
    if value is None:
        return "auto", (
            "null: fairseq2 reads reference_score_chosen/rejected from the data; PrefFlow uses those scores when "
            "every pair has them, and otherwise scores the reference it resolves (auto: the init model)"
        )
    return model_spec(value, join_key(key, fairseq2_field))


def loss_class_of(criterion: str) -> type:
    """The config class of a registered criterion; ConfigError at ``criterion`` otherwise."""
    from steps import losses

    names = losses.registered_losses()
    if criterion not in names:
        raise ConfigError(
            "",
            "criterion",
            f"unknown criterion {criterion!r}{did_you_mean(criterion, names)}; registered: {', '.join(names)}",
        )
    return losses.loss_class(criterion).config_class


def criterion_fields(criterion: str, raw: Any, label: str, defaults: bool = True) -> CriterionFields:
    """``read_criterion_config`` for the preference section: the criterion checked first, fairseq2's
    ``reference_model`` mapped to a reference spec, and the notes logged under ``label`` (the dotted key)."""
    loss_class_of(criterion)
    parts = read_criterion_config(criterion, raw, "criterion_config", defaults)
    for name, (fairseq2_field, value) in list(parts.section.items()):
        spec, what = reference_spec(fairseq2_field, value, "criterion_config")
        parts.section[name] = (fairseq2_field, spec)
        parts.notes.append((f"criterion_config.{fairseq2_field}", f"-> {name}: {spec!r} ({what})"))
    for key, message in parts.notes:
        note(label.replace("criterion_config", key, 1), message)
    return parts
