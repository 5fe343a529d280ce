"""Typed run configuration: one YAML per run, loaded into dataclasses and validated before any work.

Sections: data, model, sft, preference, evaluation, resources (plus optional deployment).
The preference section accepts fairseq2's shape unchanged::

    preference:
      criterion: simpo
      criterion_config:
        _type_: steps.losses.simpo.SimPOConfig   # optional; must match the criterion
        beta: 2.0
        gamma: 1.0

Every error names the file, the key path, the bad value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_PATH = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A run config is invalid. ``source`` is the file (or "<overrides>"), ``key`` the dotted key path."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


# --------------------------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """OpenAssistant-2 preparation (see steps.data.oasst.prepare_oasst)."""

    input: str = "embedded"  # "embedded", a Hub id (OpenAssistant/oasst2), or a local rows/trees file
    split: str = "train"
    langs: list[str] = field(default_factory=lambda: ["en"])
    pair_strategy: Literal["best_vs_rest", "best_vs_worst", "all_ordered_pairs"] = "best_vs_rest"
    sft_rank: int = 0
    tree_states: list[str] = field(default_factory=lambda: ["ready_for_export"])
    include_synthetic: bool = False
    include_deleted: bool = False
    require_review: bool = True
    dev_fraction: float = 0.1
    seed: int = 333
    max_trees: Optional[int] = None


@dataclass
class ModelConfig:
    """The base model every run starts from, as a loader spec (see steps.models)."""

    base: str = DEFAULT_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainConfig:
    """Optimisation knobs shared by SFT and preference training (torchtune-style: all knobs here)."""

    lr: float = 5.5e-6
    final_lr: Optional[float] = None  # cosine/linear decay target; None = 0.1 * lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    max_grad_norm: Optional[float] = 1.0
    max_num_tokens: int = 8192  # token budget per micro-batch (padded tokens)
    max_batch_examples: Optional[int] = None  # also cap examples per micro-batch (fixed batch sizes, benchmarks)
    max_seq_len: int = 8192
    overlength: Literal["drop", "truncate"] = "drop"
    grad_accum: int = 1
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke runs)
    max_examples: Optional[int] = None  # use the first N training examples (after the seeded shuffle)
    seed: int = 1814
    mask_source_tokens: bool = True
    checkpoint_every_steps: Optional[int] = None  # extra mid-epoch checkpoints (resume granularity)
    keep_checkpoints: int = 1
    dev_every_epoch: bool = True
    # with several ranks: "ddp" replicates the model; "fsdp" shards weights, grads and AdamW state (FSDP2)
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SFTConfig(TrainConfig):
    enabled: bool = True
    init: str = "base"  # "base" or a model spec


@dataclass
class PreferenceConfig(TrainConfig):
    criterion: str = "dpo"
    criterion_config: Any = None  # the loss's config dataclass instance (built from a dict)
    init: str = "auto"  # "auto" | "sft" | "base" | a model spec. auto: reference-based losses from SFT, others from base
    reference: str = "auto"  # "auto" | "sft" | "base" | "none" | a model spec. auto: the init model
    reference_mode: Literal["precompute", "live"] = "precompute"
    lr: float = 1e-6
    final_lr: Optional[float] = None
    # Per-loss overrides for fan-out runs (`--loss dpo,orpo`): {orpo: {lr: 8.0e-6, init: base, criterion_config: {...}}}
    per_loss: dict = field(default_factory=dict)


@dataclass
class EvaluationConfig:
    enabled: bool = True
    eval_set: str = "embedded"  # "embedded" | "alpaca_eval" (Hub) | path to a JSON eval set
    max_instructions: Optional[int] = None
    reference: str = "auto"  # auto: the eval set's outputs if present, else generated by the base model
    judge: str = "local_logprob"  # or "alpaca_eval:<annotator config name or path>"
    judge_model: str = DEFAULT_MODEL
    judge_max_chars: int = 1500
    max_new_tokens: int = 256
    temperature: float = 0.9
    top_p: float = 1.0
    seed: int = 1814
    batch_size: int = 16
    lc_assets_dir: Optional[str] = None


@dataclass
class StepResources:
    cpu: int = 2
    memory: int = 8000  # MB
    gpu: int = 0


@dataclass
class ResourcesConfig:
    """What each heavy step asks the scheduler for (read by @resources; ignored by local runs)."""

    train: StepResources = field(default_factory=StepResources)
    evaluate: StepResources = field(default_factory=StepResources)
    output_dir: str = "runs"  # where checkpoints and eval files go; shared storage when scaling out
    kubernetes: bool = False  # send GPU steps to Kubernetes (see flows/mutators.py)
    image: Optional[str] = None
    nproc_per_node: int = 1
    serialize_cpu_steps: bool = True  # without a GPU, one heavy step at a time (parallel branches thrash cores)


@dataclass
class DeploymentConfig:
    schedule_cron: Optional[str] = None  # 6-field AWS cron, e.g. "0 3 * * ? *"
    project: str = "prefflow"
    trigger_event: Optional[str] = None


@dataclass
class RunConfig:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    source: str = field(default="<dict>", metadata={"internal": True})

    def to_dict(self) -> dict:
        return config_to_dict(self)


# ------------------------------------------------------------------------------------ typed conversion

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    """Convert a YAML value to ``tp`` or raise ConfigError naming the key and what is allowed."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, source, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(source, key, f"got {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(source, key, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, source, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, key, f"got {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(source, key, f"got {value!r}; expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-7 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"got {value!r}; expected a number")
        if not math.isfinite(float(value)):
            raise ConfigError(source, key, f"got {value!r}; expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"got {value!r}; expected a string")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, f"got {value!r}; expected a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(source, key, f"got {value!r}; expected a list of {len(args)} values")
        return tuple(_convert(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"got {value!r}; expected a mapping")
        return dict(value)
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _build_dataclass(cls: type, value: Any, source: str, key: str):
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(source, key, f"got {value!r}; expected a mapping with keys of {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        bad = unknown[0]
        close = _close_matches(bad, fields)
        hint = f" (did you mean {close!r}?)" if close else ""
        where = f"{key}.{bad}" if key else bad
        raise ConfigError(source, where, f"unknown key{hint}; allowed keys: {', '.join(fields)}")
    kwargs = {}
    for name, val in value.items():
        kwargs[name] = _convert(val, hints[name], source, f"{key}.{name}" if key else name)
    return cls(**kwargs)


def _close_matches(word: str, options) -> Optional[str]:
    import difflib

    found = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return found[0] if found else None


# ------------------------------------------------------------------------------------ validation


def _check(cond: bool, source: str, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(source, key, message)


def _validate_train(cfg: TrainConfig, source: str, section: str) -> None:
    k = lambda name: f"{section}.{name}"  # noqa: E731
    _check(cfg.lr > 0, source, k("lr"), f"got {cfg.lr!r}; must be > 0")
    if cfg.final_lr is not None:
        _check(0 <= cfg.final_lr <= cfg.lr, source, k("final_lr"), f"got {cfg.final_lr!r}; must be in [0, lr={cfg.lr}]")
    _check(cfg.epochs >= 1, source, k("epochs"), f"got {cfg.epochs!r}; must be >= 1")
    _check(cfg.grad_accum >= 1, source, k("grad_accum"), f"got {cfg.grad_accum!r}; must be >= 1")
    _check(cfg.warmup_steps >= 0, source, k("warmup_steps"), f"got {cfg.warmup_steps!r}; must be >= 0")
    _check(cfg.max_seq_len >= 8, source, k("max_seq_len"), f"got {cfg.max_seq_len!r}; must be >= 8")
    _check(cfg.max_num_tokens >= cfg.max_seq_len, source, k("max_num_tokens"),
           f"got {cfg.max_num_tokens!r}; must be >= max_seq_len ({cfg.max_seq_len}) so every kept example fits a batch")
    _check(cfg.weight_decay >= 0, source, k("weight_decay"), f"got {cfg.weight_decay!r}; must be >= 0")
    for i, b in enumerate(cfg.betas):
        _check(0 <= b < 1, source, k(f"betas[{i}]"), f"got {b!r}; must be in [0, 1)")
    if cfg.max_grad_norm is not None:
        _check(cfg.max_grad_norm > 0, source, k("max_grad_norm"), f"got {cfg.max_grad_norm!r}; must be > 0 or null")
    for name in ("max_steps", "max_examples", "max_batch_examples", "checkpoint_every_steps"):
        val = getattr(cfg, name)
        if val is not None:
            _check(val >= 1, source, k(name), f"got {val!r}; must be >= 1 or null")
    _check(cfg.keep_checkpoints >= 1, source, k("keep_checkpoints"), "must be >= 1")
    _check(not (cfg.parallelism == "fsdp" and cfg.lora.enabled), source, k("parallelism"),
           "fsdp shards full fine-tuning; with lora.enabled use parallelism: ddp (adapters are small)")


def build_criterion_config(criterion: str, raw: Any, source: str, key: str = "preference"):
    """Turn a fairseq2-shaped ``criterion_config`` mapping into the loss's config dataclass."""
    from steps import losses

    names = losses.registered_losses()
    if criterion not in names:
        raise ConfigError(source, f"{key}.criterion",
                          f"unknown criterion {criterion!r}; registered: {', '.join(sorted(names))}")
    cls = losses.loss_class(criterion).config_class
    if dataclasses.is_dataclass(raw) and isinstance(raw, cls):
        return raw
    raw = dict(raw or {})
    type_path = raw.pop("_type_", None)
    expected = f"{cls.__module__}.{cls.__qualname__}"
    if type_path is not None and type_path not in (expected, cls.__qualname__):
        raise ConfigError(source, f"{key}.criterion_config._type_",
                          f"got {type_path!r}, which does not match criterion {criterion!r}; use {expected!r} or omit _type_")
    try:
        return _build_dataclass(cls, raw, source, f"{key}.criterion_config")
    except ConfigError:
        raise
    except ValueError as exc:  # the loss config's own range checks
        field_name = getattr(exc, "field", None)
        where = f"{key}.criterion_config" + (f".{field_name}" if field_name else "")
        raise ConfigError(source, where, str(exc)) from exc


def validate(cfg: RunConfig) -> RunConfig:
    src = cfg.source
    _validate_train(cfg.sft, src, "sft")
    _validate_train(cfg.preference, src, "preference")
    d = cfg.data
    _check(0 <= d.dev_fraction < 1, src, "data.dev_fraction", f"got {d.dev_fraction!r}; must be in [0, 1)")
    _check(d.sft_rank >= 0, src, "data.sft_rank", f"got {d.sft_rank!r}; must be >= 0")
    p = cfg.preference
    p.criterion_config = build_criterion_config(p.criterion, p.criterion_config, src)
    for loss_name, override in p.per_loss.items():
        per_key = f"preference.per_loss.{loss_name}"
        if not isinstance(override, dict):
            raise ConfigError(src, per_key, f"got {override!r}; expected a mapping of preference keys")
        resolve_preference(cfg, loss_name, key=per_key)  # validates names, keys, ranges
    for name in ("init", "reference"):
        _check(getattr(p, name) not in ("",), src, f"preference.{name}", "must not be empty")
    e = cfg.evaluation
    _check(e.max_new_tokens >= 1, src, "evaluation.max_new_tokens", "must be >= 1")
    _check(e.temperature >= 0, src, "evaluation.temperature", f"got {e.temperature!r}; must be >= 0")
    _check(0 < e.top_p <= 1, src, "evaluation.top_p", f"got {e.top_p!r}; must be in (0, 1]")
    _check(e.batch_size >= 1, src, "evaluation.batch_size", "must be >= 1")
    if e.max_instructions is not None:
        _check(e.max_instructions >= 1, src, "evaluation.max_instructions", "must be >= 1 or null")
    cron = cfg.deployment.schedule_cron
    if cron is not None:
        _check(len(cron.split()) == 6, src, "deployment.schedule_cron",
               f"got {cron!r}; use the 6-field AWS form, e.g. '0 3 * * ? *'")
    return cfg


def resolve_preference(cfg: RunConfig, loss: str, key: str = "preference") -> PreferenceConfig:
    """The preference section for one loss: base section + ``per_loss[loss]`` overrides, validated.

    When the loss differs from ``criterion``, the base ``criterion_config`` does not apply
    (its fields belong to another loss); the loss's defaults are used unless per_loss gives some.
    """
    base = cfg.preference
    override = copy.deepcopy(base.per_loss.get(loss, {}))
    raw = {f.name: copy.deepcopy(getattr(base, f.name)) for f in dataclasses.fields(PreferenceConfig)}
    raw.pop("per_loss")
    raw["criterion"] = loss
    if loss != base.criterion:
        raw["criterion_config"] = {}
    elif dataclasses.is_dataclass(raw["criterion_config"]):
        raw["criterion_config"] = {f.name: getattr(raw["criterion_config"], f.name)
                                   for f in dataclasses.fields(raw["criterion_config"])}
    if "per_loss" in override:
        raise ConfigError(cfg.source, f"{key}.per_loss", "per_loss cannot be nested")
    crit_override = override.pop("criterion_config", None)
    if "criterion" in override and override.pop("criterion") != loss:
        raise ConfigError(cfg.source, f"{key}.criterion", "per_loss entries cannot change the criterion")
    typed = _build_dataclass(PreferenceConfig, {**_as_yaml_values(raw), **override}, cfg.source, key)
    merged_cc = dict(raw["criterion_config"] or {})
    merged_cc.update(crit_override or {})
    typed.criterion_config = build_criterion_config(loss, merged_cc, cfg.source, key)
    _validate_train(typed, cfg.source, key)
    return typed


def _as_yaml_values(raw: dict) -> dict:
    out = {}
    for k, v in raw.items():
        if dataclasses.is_dataclass(v):
            v = config_to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------ loading


def parse_yaml_text(text: str, source: str = "<config>") -> dict:
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"expected a mapping of sections, got {type(data).__name__}")
    return data


def config_from_dict(data: dict, source: str = "<dict>", overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    data = copy.deepcopy(data)
    for path, value in (overrides or {}).items():
        _set_path(data, path, value)
    cfg = _build_dataclass(RunConfig, data, source, "")
    cfg.source = source
    return validate(cfg)


def load_config(path: str | os.PathLike | None = None, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    if not path.exists():
        raise ConfigError(str(path), "", "file not found; pass an existing YAML config (see configs/)")
    return config_from_dict(parse_yaml_text(path.read_text(encoding="utf-8"), str(path)), str(path), overrides)


def parse_overrides(text: str | list[str] | None) -> dict[str, Any]:
    """``"preference.criterion_config.beta=0.5 sft.epochs=2"`` -> {dotted key: YAML-parsed value}."""
    if not text:
        return {}
    items = text if isinstance(text, list) else re.split(r"[\s;]+", text.strip())
    out: dict[str, Any] = {}
    for item in items:
        if not item:
            continue
        if "=" not in item:
            raise ConfigError("<overrides>", item, "expected key.path=value, e.g. preference.criterion_config.beta=0.5")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError("<overrides>", ".".join(parts[: i + 1]), f"is {nxt!r}, not a section; cannot set {dotted}")
        node = nxt
    node[parts[-1]] = value


def config_to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            out[f.name] = config_to_dict(getattr(obj, f.name))
        if type(obj).__module__.startswith("steps.losses"):
            out = {"_type_": f"{type(obj).__module__}.{type(obj).__qualname__}", **out}
        return out
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


def parse_losses(text: str | None, cfg: RunConfig) -> list[str]:
    """``--loss dpo,simpo`` -> ["dpo", "simpo"]; "sft" means SFT only; empty -> the config's criterion."""
    from steps import losses

    if not text:
        return [cfg.preference.criterion]
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["sft"]:
        return []
    registered = losses.registered_losses()
    for name in names:
        if name not in registered:
            raise ConfigError("--loss", name, f"unknown loss; registered: {', '.join(sorted(registered))} (or 'sft' for SFT only)")
    if len(set(names)) != len(names):
        raise ConfigError("--loss", text, "a loss is listed twice")
    return names


# ------------------------------------------------------------------------------------ sweeps


def variant(name: str, loss: str, overrides: Optional[dict[str, Any]] = None) -> dict:
    """One branch of the flow's foreach: a name (directory, table row), a loss ("sft" or registered) and
    dotted config overrides applied on top of the run config."""
    return {"name": name, "loss": loss, "overrides": dict(overrides or {})}


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def load_sweep(path: str | os.PathLike, cfg: RunConfig) -> list[dict]:
    """A sweep file -> one variant per grid point, each validated against ``cfg``.

    Format (keys of ``grid`` are keys of the preference section, dotted for criterion_config)::

        loss: simpo
        grid:
          criterion_config.beta: [2.0, 2.5]
          criterion_config.gamma: [0.3, 0.5, 1.0, 1.2, 1.4, 1.6]
    """
    import itertools

    from steps import losses

    source = str(path)
    if not Path(path).exists():
        raise ConfigError(source, "", "sweep file not found")
    raw = parse_yaml_text(Path(path).read_text(encoding="utf-8"), source)
    unknown = sorted(set(raw) - {"loss", "grid"})
    if unknown:
        raise ConfigError(source, unknown[0], "unknown key; allowed keys: loss, grid")
    loss = raw.get("loss")
    if loss not in losses.registered_losses():
        raise ConfigError(source, "loss", f"got {loss!r}; registered: {', '.join(losses.registered_losses())}")
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(source, "grid", "expected a mapping of preference keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(source, f"grid.{key}", f"got {values!r}; expected a non-empty list")
    keys = list(grid)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        overrides = {f"preference.per_loss.{loss}.{k}": v for k, v in zip(keys, combo)}
        name = loss + "".join(f"-{k.split('.')[-1]}{_fmt_value(v)}" for k, v in zip(keys, combo))
        try:
            point_cfg = config_from_dict(config_to_dict(cfg), source, overrides)
            resolve_preference(point_cfg, loss)
        except ConfigError as exc:
            raise ConfigError(source, f"grid ({name})", str(exc)) from exc
        points.append(variant(name, loss, overrides))
    return points
