"""The training sections of the run config, ``sft`` and ``preference`` (one ``TrainConfig`` of optimisation knobs
each), and how the preference section resolves for one loss of a fan-out run."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from steps.config.convert import (
    TYPE_TAGGED,
    ConfigError,
    build,
    checked,
    construct,
    convert_fields,
    did_you_mean,
    short,
)
from steps.config.convert import require as _require
from steps.config.onpolicy import OnPolicyConfig
from steps.config.overrides import set_path

#: How far above lr a final_lr may rise (fairseq2's own examples rise 1.8x): beyond it, surely a typo.
MAX_LR_RISE = 1000.0
#: More epochs than any run needs; the loop plans every epoch's batches, so 10**30 would never start.
MAX_EPOCHS = 100_000


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (peft) on a frozen base; QLoRA when the base is loaded in 4 bits (bitsandbytes, CUDA only)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # QLoRA: the frozen base in 4 bits, computing in model.dtype; needs a CUDA GPU and bitsandbytes (checked when
    # the training step starts, not here: configs are loaded on machines without the GPU)
    load_in_4bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    # what the step hands on as its model directory: the adapters merged into a plain model, or the adapter
    # alone (+ tokenizer + the base's spec in adapter_config.json); steps.models.load_model loads either
    hand_on: Literal["merged", "adapter"] = "merged"

    def check(self) -> None:
        _require(self.r >= 1, "r", f"got {self.r!r}; must be >= 1")
        _require(self.alpha >= 1, "alpha", f"got {self.alpha!r}; must be >= 1")
        _require(0 <= self.dropout < 1, "dropout", f"got {self.dropout!r}; must be in [0, 1)")
        _require(bool(self.target_modules), "target_modules", "must name at least one module (e.g. q_proj)")
        if not self.enabled:
            for name in ("load_in_4bit", "hand_on"):
                _require(
                    getattr(self, name) == getattr(LoraConfig, name),
                    name,
                    f"got {getattr(self, name)!r} but lora.enabled is false; set enabled: true (or remove {name})",
                )
        _require(
            not (self.load_in_4bit and self.hand_on == "merged"),
            "hand_on",
            "a 4-bit base cannot be merged with its adapters into a plain model; with load_in_4bit: true set "
            "hand_on: adapter (the adapter is handed on and loaded over the full-precision base)",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation knobs shared by SFT and preference training (torchtune-style: all knobs here)."""

    lr: float = 5.5e-6
    final_lr: float | None = None  # the schedule's end value; None = 0.1 * lr; above lr, the lr rises (fairseq2 too)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # steps after warmup from lr to final_lr; null: the run's own steps. fairseq2's cycle_len (null there: its
    # max_num_steps - warmup), so a run that ends earlier stops part-way down the cosine; a cosine restarts after it
    schedule_cycle_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0
    max_num_tokens: int = 8192  # token budget per micro-batch (padded tokens)
    max_batch_examples: int | None = None  # also cap examples per micro-batch (fixed batch sizes, benchmarks)
    max_seq_len: int = 8192
    overlength: Literal["drop", "truncate"] = "drop"
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    max_examples: int | None = None  # use the first N training examples (after the seeded shuffle)
    seed: int = 1814
    mask_source_tokens: bool = True
    checkpoint_every_steps: int | None = None  # extra mid-epoch checkpoints (resume granularity)
    keep_checkpoints: int = 1
    dev_every_epoch: bool = True
    # with several ranks: "ddp" replicates the model; "fsdp" shards weights, grads and AdamW state (FSDP2)
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    lora: LoraConfig = field(default_factory=LoraConfig)

    def check(self) -> None:
        _require(self.lr > 0, "lr", f"got {self.lr!r}; must be > 0")
        if self.final_lr is not None:
            _require(
                0 <= self.final_lr <= MAX_LR_RISE * self.lr,
                "final_lr",
                f"got {self.final_lr!r}; must be >= 0 and at most {MAX_LR_RISE:g} x lr ({self.lr:g}), or null",
            )
        _require(
            self.epochs <= MAX_EPOCHS, "epochs", f"got {self.epochs!r}; must be <= {MAX_EPOCHS} (max_steps ends runs)"
        )
        for name, least in (
            ("epochs", 1),
            ("grad_accum", 1),
            ("warmup_steps", 0),
            ("max_seq_len", 8),
            ("keep_checkpoints", 1),
        ):
            value = getattr(self, name)
            _require(value >= least, name, f"got {value!r}; must be >= {least}")
        _require(
            self.max_num_tokens >= self.max_seq_len,
            "max_num_tokens",
            f"got {self.max_num_tokens!r}; must be >= max_seq_len ({self.max_seq_len}) so every kept example "
            "fits a batch",
        )
        _require(self.weight_decay >= 0, "weight_decay", f"got {self.weight_decay!r}; must be >= 0")
        for i, beta in enumerate(self.betas):
            _require(0 <= beta < 1, f"betas[{i}]", f"got {beta!r}; must be in [0, 1)")
        if self.max_grad_norm is not None:
            _require(self.max_grad_norm > 0, "max_grad_norm", f"got {self.max_grad_norm!r}; must be > 0 or null")
        for name in (
            "max_steps",
            "max_examples",
            "max_batch_examples",
            "checkpoint_every_steps",
            "schedule_cycle_steps",
        ):
            value = getattr(self, name)
            if value is not None:
                _require(value >= 1, name, f"got {value!r}; must be >= 1 or null")
        _require(
            not (self.parallelism == "fsdp" and self.lora.enabled),
            "parallelism",
            "fsdp shards full fine-tuning; with lora.enabled (LoRA or QLoRA) use parallelism: ddp (adapters are small)",
        )

    def notes(self) -> list[tuple[str, str]]:
        """Accepted settings worth a word in the log (fairseq2 runs them too)."""
        if self.final_lr is not None and self.final_lr > self.lr and self.schedule != "constant":
            return [("final_lr", f"{self.final_lr:g} is above lr {self.lr:g}: the learning rate rises over the run")]
        return []


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    enabled: bool = True
    init: str = "base"  # "base" or a model spec


@dataclass(frozen=True)
class PreferenceConfig(TrainConfig):
    criterion: str = "dpo"
    # the loss's config dataclass, typed on construction from a mapping of its fields (fairseq2's shape, with
    # _type_ and its own fields, is translated to that mapping when the config is loaded: steps.config.fairseq2_losses)
    criterion_config: Any = field(default=None, metadata=TYPE_TAGGED)
    init: str = "auto"  # "auto" | "sft" | "base" | a model spec. auto: reference-based losses from SFT, else base
    reference: str = "auto"  # "auto" | "sft" | "base" | "none" | a model spec. auto: the init model
    reference_mode: Literal["precompute", "live"] = "precompute"
    lr: float = 1e-6
    final_lr: float | None = None
    # Per-loss overrides for fan-out runs (`--loss dpo,orpo`): {orpo: {lr: 8.0e-6, init: base, criterion_config: {..}}},
    # each resolved once, when the run is planned (steps.config.plan)
    per_loss: dict[str, dict] = field(default_factory=dict)
    # rounds of sampling from the policy, judging and training on the judged pairs (disabled: the fixed pairs)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    def __post_init__(self) -> None:
        cls, raw = loss_class_of(self.criterion), self.criterion_config
        if not isinstance(raw, cls):
            _require(
                not (dataclasses.is_dataclass(raw) and not isinstance(raw, type)),
                "criterion_config",
                f"is a {type(raw).__qualname__}, which does not match criterion {self.criterion!r} "
                f"({cls.__module__}.{cls.__qualname__})",
            )
            object.__setattr__(self, "criterion_config", build(cls, loss_fields(cls, raw), "criterion_config"))

    def check(self) -> None:
        super().check()
        for name in ("init", "reference"):
            _require(getattr(self, name) != "", name, "must not be empty")
        from steps import losses

        names = losses.registered_losses()
        for loss in self.per_loss:
            _require(
                loss in names,
                f"per_loss.{loss}",
                f"unknown loss{did_you_mean(loss, names)}; registered: {', '.join(names)}",
            )


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


def loss_fields(cls: type, raw: Any) -> Mapping[str, Any]:
    """``criterion_config`` as a mapping of ``cls`` fields (null: none); ConfigError otherwise."""
    _require(
        raw is None or isinstance(raw, Mapping),
        "criterion_config",
        f"got {short(raw)}; expected a mapping of {cls.__name__} fields",
    )
    return raw or {}


def resolve_preference(
    section: PreferenceConfig, loss: str, overrides: Mapping[str, Any] | None = None
) -> PreferenceConfig:
    """The preference section for one loss: the section, then ``per_loss[loss]``, then dotted ``overrides``.

    When the loss is not the section's criterion, its ``criterion_config`` belongs to another loss and does not
    apply; the loss's defaults do, unless per_loss or the overrides give fields. Errors are relative to the section.
    """
    merged = copy.deepcopy(dict(section.per_loss.get(loss) or {}))
    for dotted, value in (overrides or {}).items():
        set_path(merged, dotted, value)
    _require("per_loss" not in merged, "per_loss", "per_loss cannot be nested")
    _require(
        merged.pop("criterion", loss) == loss, "criterion", "per_loss entries and sweeps cannot change the criterion"
    )
    cls = loss_class_of(loss)
    fields = loss_fields(cls, merged.pop("criterion_config", None))
    kwargs = convert_fields(PreferenceConfig, merged)
    cc: Any
    if loss != section.criterion:
        cc = build(cls, fields, "criterion_config")
    elif fields:
        base = section.criterion_config
        changes = convert_fields(cls, fields, "criterion_config")
        cc = construct(lambda: dataclasses.replace(base, **changes), "criterion_config")
    else:
        cc = section.criterion_config  # the same object: no rebuild on the way to the loss
    resolved = construct(
        lambda: dataclasses.replace(section, criterion=loss, criterion_config=cc, per_loss={}, **kwargs), ""
    )
    where = f"preference.per_loss.{loss}" if loss in section.per_loss else "preference"
    return checked(resolved, label=where)
