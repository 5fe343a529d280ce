"""fairseq2's spelling of PrefFlow's losses in one table, and the translation of a fairseq2-shaped preference section
into PrefFlow's plain form, once, when a config mapping is loaded (steps.config.loading).

A ``criterion_config`` with ``_type_`` (fairseq2's config classes of both recipe generations, bare or under
``fairseq2.``, or PrefFlow's own class path) or with fairseq2-only fields becomes a mapping of the loss config's own
fields: fairseq2's defaults fill what a fairseq2-typed mapping leaves out (the same YAML means the same training),
``reference_model`` becomes the section's ``reference``, fields that act differently or not at all here get a
one-line note. The losses and the typed config never see fairseq2's names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from steps.config.convert import ConfigError, did_you_mean, join_key, note, require, short, yaml_fields
from steps.config.fairseq2_names import reference_spec, refuse_checkpoint_names
from steps.config.training import PreferenceConfig


@dataclass(frozen=True)
class Fairseq2Loss:
    """How fairseq2 spells one loss's config.

    ``class_names``: fairseq2's config classes for the loss in both recipe generations (2024 ``DpoConfig``, 2025
    ``DpoFinetuneConfig``, ...); a ``criterion_config._type_`` naming one (bare or under ``fairseq2.``) is an alias
    of the loss's config. ``defaults``: fairseq2's values for fields such a mapping leaves out (fairseq2's meaning
    wins). ``section_fields``: fairseq2 fields that set a preference-section key here (``reference_model`` ->
    ``reference``). ``changed``: fields that map but act differently here, and how. ``no_effect``: fairseq2-only
    fields, accepted with a note saying why they do nothing here.
    """

    class_names: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    section_fields: Mapping[str, str] = field(default_factory=dict)
    changed: Mapping[str, str] = field(default_factory=dict)
    no_effect: Mapping[str, str] = field(default_factory=dict)

    def names_type(self, type_path: str) -> bool:
        """Whether ``type_path`` (``fairseq2.<module>.<Class>`` or a bare class name) is one of these classes."""
        module, _, name = type_path.rpartition(".")
        return name in self.class_names and (not module or module == "fairseq2" or module.startswith("fairseq2."))

    @property
    def fields(self) -> tuple[str, ...]:
        """Every fairseq2-only field name this loss accepts besides its own config fields."""
        return (*self.section_fields, *self.no_effect)


#: fairseq2's losses (its recipe config classes and docs) by PrefFlow loss name; losses not here have no fairseq2
#: counterpart. fairseq2's SimPO gamma is the same margin γ (its logits are β·ΔA − γ): values carry over as they are.
FAIRSEQ2_LOSSES: dict[str, Fairseq2Loss] = {
    "dpo": Fairseq2Loss(
        class_names=("DpoConfig", "DpoFinetuneConfig"),
        defaults={"beta": 0.1, "nll_scale": 0.0, "length_normalization": False},
        section_fields={"reference_model": "reference"},
        no_effect={
            "reference_dtype": "the reference model is loaded in model.dtype; PrefFlow scores it once before "
            "training by default (reference_mode: precompute), so its precision costs no training memory",
            "reference_tensor_parallel_size": "PrefFlow has no tensor parallelism; the reference is scored "
            "data-parallel over the ranks (precompute) or replicated on each (live)",
        },
    ),
    "simpo": Fairseq2Loss(
        class_names=("SimPOConfig", "SimPOFinetuneConfig"),
        defaults={"beta": 1.0, "gamma": 0.5, "nll_scale": 0.0},
    ),
    "orpo": Fairseq2Loss(
        class_names=("OrpoConfig", "ORPOConfig", "OrpoFinetuneConfig"),
        defaults={"orpo_lambda": 1.0, "nll_scale": 1.0},
        changed={
            "orpo_lambda": "applied here; fairseq2 computed the odds-ratio term but never multiplied it by "
            "orpo_lambda, so its runs trained with an effective lambda of 1.0 whatever the config said",
        },
    ),
    "cpo": Fairseq2Loss(
        class_names=("CpoConfig", "CPOConfig", "CpoFinetuneConfig"),
        defaults={"beta": 1.0, "nll_scale": 1.0},
    ),
}


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _config_class(loss: str) -> type:
    from steps import losses

    return losses.loss_class(loss).config_class


def _registered(loss: Any) -> bool:
    from steps import losses

    return isinstance(loss, str) and loss in losses.registered_losses()


def loss_for_type(type_path: str) -> str | None:
    """The registered loss whose config ``type_path`` names (its PrefFlow class path or a fairseq2 alias), if any."""
    from steps import losses

    for name in losses.registered_losses():
        config_class = _config_class(name)
        names = FAIRSEQ2_LOSSES.get(name)
        if type_path in (_path(config_class), config_class.__qualname__) or (names and names.names_type(type_path)):
            return name
    return None


@dataclass
class PlainCriterion:
    """A ``criterion_config`` mapping read for one loss: ``fields`` of its config class, ``section`` keys of the
    preference section that fairseq2-only fields set ({section key: (fairseq2 field, value)}), ``notes`` ((key,
    message) pairs to log) and whether ``_type_`` named a fairseq2 class."""

    fields: dict[str, Any] = field(default_factory=dict)
    section: dict[str, tuple[str, Any]] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)
    fairseq2: bool = False


def _read_type(loss: str, type_path: Any, key: str) -> bool:
    """Whether ``_type_`` names fairseq2's class for ``loss`` (False: PrefFlow's own or none); ConfigError when it
    names another loss's config or nothing known."""
    cls, names = _config_class(loss), FAIRSEQ2_LOSSES.get(loss)
    if type_path is None or type_path in (_path(cls), cls.__qualname__):
        return False
    if isinstance(type_path, str) and names is not None and names.names_type(type_path):
        return True
    other = loss_for_type(type_path) if isinstance(type_path, str) else None
    hint = f" (it names the config of {other!r})" if other else ""
    aliases = f", fairseq2's {' / '.join(names.class_names)}" if names else ""
    raise ConfigError(
        "",
        join_key(key, "_type_"),
        f"got {short(type_path)}, which does not match criterion {loss!r}{hint}; use {_path(cls)!r}{aliases} or "
        "omit _type_",
    )


def read_criterion_config(loss: str, raw: Mapping, key: str = "criterion_config", defaults: bool = True) -> Any:
    """``raw`` (a mapping, optionally with ``_type_``) read for ``loss``, errors at ``key``.

    With a fairseq2 ``_type_`` and ``defaults``, fields left out take fairseq2's defaults; fairseq2-only fields are
    mapped (``section_fields``) or accepted with a note (``no_effect``).
    """
    names = FAIRSEQ2_LOSSES.get(loss)
    raw = dict(raw)
    out = PlainCriterion(fairseq2=_read_type(loss, raw.pop("_type_", None), key))
    own = yaml_fields(_config_class(loss))
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
            allowed = [*own, *(names.fields if names else ())]
            raise ConfigError(
                "", where, f"unknown key{did_you_mean(str(name), allowed)}; allowed keys: {', '.join(allowed)}"
            )
    if out.fairseq2 and defaults and names:
        filled = {k: v for k, v in names.defaults.items() if k not in out.fields}
        out.fields.update(filled)
        ours = {f.name: f.default for f in dataclasses.fields(_config_class(loss))}
        differ = [f"{k}={v!r} (PrefFlow's default {ours[k]!r})" for k, v in filled.items() if ours.get(k) != v]
        if differ:
            out.notes.append((key, f"fairseq2's defaults for the fields left out: {', '.join(differ)}"))
    return out


def _plain_entry(loss: str, entry: Mapping, label: str, defaults: bool, current: Mapping) -> dict:
    """One section (or per_loss entry) with its ``criterion_config`` read for ``loss``: fairseq2's section fields set
    on it (``reference_model`` -> ``reference``, unless ``current`` already says otherwise), notes logged at
    ``label``. Errors are relative to the entry."""
    parts = read_criterion_config(loss, entry["criterion_config"], "criterion_config", defaults)
    out = {**entry, "criterion_config": parts.fields}
    for name, (fairseq2_field, value) in parts.section.items():
        spec, what = reference_spec(fairseq2_field, value, "criterion_config")
        given = current.get(name, "auto")
        require(
            given in ("auto", spec),
            f"criterion_config.{fairseq2_field}",
            f"sets {name} to {spec!r}, but {name} is {given!r}: give only one of them",
        )
        out[name] = spec
        parts.notes.append((f"criterion_config.{fairseq2_field}", f"-> {name}: {spec!r} ({what})"))
    for key, message in parts.notes:
        note(label.replace("criterion_config", key, 1), message)
    return out


def plain_preference(section: Any) -> Any:
    """The preference section of a YAML mapping in PrefFlow's plain form (see the module); whatever is not shaped
    like a section is returned as it is, for the typed config to reject. Errors are relative to the section."""
    if not isinstance(section, Mapping):
        return section
    criterion = section.get("criterion", PreferenceConfig.criterion)
    out = dict(section)
    if _registered(criterion) and isinstance(section.get("criterion_config"), Mapping):
        out = _plain_entry(criterion, section, "preference.criterion_config", True, section)
    per_loss = section.get("per_loss")
    if not isinstance(per_loss, Mapping):
        return out
    plain: dict[Any, Any] = {}
    for loss, entry in per_loss.items():
        if _registered(loss) and isinstance(entry, Mapping) and isinstance(entry.get("criterion_config"), Mapping):
            where = f"per_loss.{loss}"
            try:
                entry = _plain_entry(loss, entry, f"preference.{where}.criterion_config", loss != criterion, entry)
            except ConfigError as exc:
                raise exc.within(where) from None
        plain[loss] = entry
    return {**out, "per_loss": plain}


def plain_config(data: Mapping) -> Mapping:
    """A run config mapping in PrefFlow's plain form: its preference section translated, fairseq2 checkpoint names
    refused where a model is named (steps.config.fairseq2_names); errors at dotted keys."""
    refuse_checkpoint_names(data)
    section = data.get("preference")
    if not isinstance(section, Mapping):
        return data
    try:
        return {**data, "preference": plain_preference(section)}
    except ConfigError as exc:
        raise exc.within("preference") from None
