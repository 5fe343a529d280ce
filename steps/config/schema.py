"""The run config's sections as typed dataclasses, each with its own rules (``check``): one validation layer.

The converter (steps.config.convert) types YAML values and runs ``check``; errors come out at dotted keys."""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from steps.config.convert import (
    INTERNAL,
    TYPE_TAGGED,
    ConfigError,
    build,
    checked,
    construct,
    convert_fields,
    did_you_mean,
    to_dict,
)
from steps.config.overrides import set_path
from steps.evaluate.settings import GenerationSettings
from steps.models import DEFAULT_MODEL

#: Metaflow's rule for @project names.
PROJECT_NAME = re.compile(r"^[a-z0-9_]+$")


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError("", key, message)


@dataclass(frozen=True)
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
    max_trees: int | None = None

    def check(self) -> None:
        _require(0 <= self.dev_fraction < 1, "dev_fraction", f"got {self.dev_fraction!r}; must be in [0, 1)")
        _require(self.sft_rank >= 0, "sft_rank", f"got {self.sft_rank!r}; must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """The base model every run starts from, as a loader spec (see steps.models)."""

    base: str = DEFAULT_MODEL
    # COMPUTE dtype of training (matmuls, activations; reference log-probs and dev evaluation too).
    # auto: bf16 on a CUDA GPU that supports it, else fp32. bf16 with fp32 master weights = mixed precision.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # dtype of the weights, gradients and AdamW state that the optimizer updates (and checkpoints and the
    # model handed to the next step keep). bfloat16 only when memory forces it: small updates are lost.
    master_dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None

    def check(self) -> None:
        _require(
            self.dtype != "float16",
            "dtype",
            "float16 compute needs loss scaling, which the trainer does not do; use bfloat16 (or float32)",
        )
        _require(
            not (self.dtype == "float32" and self.master_dtype == "bfloat16"),
            "dtype",
            "float32 compute with master_dtype bfloat16 computes more precisely than the weights are kept; "
            "use dtype: bfloat16 (or master_dtype: float32)",
        )


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation knobs shared by SFT and preference training (torchtune-style: all knobs here)."""

    lr: float = 5.5e-6
    final_lr: float | None = None  # cosine/linear decay target; None = 0.1 * lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
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
            _require(0 <= self.final_lr <= self.lr, "final_lr", f"got {self.final_lr!r}; must be in [0, lr={self.lr}]")
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
        for name in ("max_steps", "max_examples", "max_batch_examples", "checkpoint_every_steps"):
            value = getattr(self, name)
            if value is not None:
                _require(value >= 1, name, f"got {value!r}; must be >= 1 or null")
        _require(
            not (self.parallelism == "fsdp" and self.lora.enabled),
            "parallelism",
            "fsdp shards full fine-tuning; with lora.enabled use parallelism: ddp (adapters are small)",
        )


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    enabled: bool = True
    init: str = "base"  # "base" or a model spec


@dataclass(frozen=True)
class PreferenceConfig(TrainConfig):
    criterion: str = "dpo"
    # the loss's config dataclass; YAML gives fairseq2's mapping (optionally with _type_), typed on construction
    criterion_config: Any = field(default=None, metadata=TYPE_TAGGED)
    init: str = "auto"  # "auto" | "sft" | "base" | a model spec. auto: reference-based losses from SFT, else base
    reference: str = "auto"  # "auto" | "sft" | "base" | "none" | a model spec. auto: the init model
    reference_mode: Literal["precompute", "live"] = "precompute"
    lr: float = 1e-6
    final_lr: float | None = None
    # Per-loss overrides for fan-out runs (`--loss dpo,orpo`): {orpo: {lr: 8.0e-6, init: base, criterion_config: {...}}}
    per_loss: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "criterion_config", loss_config(self.criterion, self.criterion_config))

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
            construct(functools.partial(resolve_preference, self, loss), f"per_loss.{loss}")


def loss_config(criterion: str, raw: Any) -> Any:
    """fairseq2's ``criterion_config`` (a mapping, optionally with ``_type_``) as the loss's config dataclass."""
    from steps import losses

    names = losses.registered_losses()
    _require(
        criterion in names,
        "criterion",
        f"unknown criterion {criterion!r}{did_you_mean(criterion, names)}; registered: {', '.join(names)}",
    )
    cls = losses.loss_class(criterion).config_class
    if isinstance(raw, cls):
        return raw
    _require(
        not dataclasses.is_dataclass(raw),
        "criterion_config",
        f"is a {type(raw).__qualname__}, which does not match criterion {criterion!r} ({_path(cls)})",
    )
    return build(cls, _untagged(criterion, cls, raw), "criterion_config")


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _untagged(criterion: str, cls: type, raw: Any) -> dict:
    """The fields of a ``criterion_config`` mapping, after checking its optional ``_type_`` against the criterion."""
    if raw is None:
        return {}
    _require(isinstance(raw, Mapping), "criterion_config", f"got {raw!r}; expected a mapping of {cls.__name__} fields")
    fields = dict(raw)
    type_path = fields.pop("_type_", None)
    _require(
        type_path is None or type_path in (_path(cls), cls.__qualname__),
        "criterion_config._type_",
        f"got {type_path!r}, which does not match criterion {criterion!r}; use {_path(cls)!r} or omit _type_",
    )
    return fields


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
    cc_raw = merged.pop("criterion_config", None)
    kwargs = convert_fields(PreferenceConfig, merged)
    if loss != section.criterion:
        cc = loss_config(loss, cc_raw)
    elif cc_raw:
        base = section.criterion_config
        changes = convert_fields(type(base), _untagged(loss, type(base), cc_raw), "criterion_config")
        cc = construct(lambda: dataclasses.replace(base, **changes), "criterion_config")
    else:
        cc = section.criterion_config  # the same object: no rebuild on the way to the loss
    resolved = construct(
        lambda: dataclasses.replace(section, criterion=loss, criterion_config=cc, per_loss={}, **kwargs), ""
    )
    return checked(resolved)


@dataclass(frozen=True)
class EvaluationConfig:
    """AlpacaEval 2 settings; the generation knobs are validated once, as ``generation`` (GenerationSettings)."""

    enabled: bool = True
    eval_set: str = "embedded"  # "embedded" | "alpaca_eval" (Hub) | path to a JSON eval set
    max_instructions: int | None = None
    reference: str = "auto"  # auto: the eval set's outputs if present, else generated by the base model
    judge: str = "local_logprob"  # or "alpaca_eval:<annotator config name or path>"
    judge_model: str = DEFAULT_MODEL
    judge_max_chars: int = 1500
    max_new_tokens: int = 256
    temperature: float = 0.9
    top_p: float = 1.0
    seed: int = 1814
    batch_size: int = 16
    lc_assets_dir: str | None = None
    # weights dtype of the generating model (HF backend); auto: bf16 on a CUDA GPU that supports it, else fp32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["auto", "hf", "vllm"] = "auto"  # auto: vLLM when installed and a GPU is present, else HF
    generation: GenerationSettings = field(init=False, repr=False, compare=False, metadata=INTERNAL)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "generation",
            GenerationSettings(
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
                batch_size=self.batch_size,
            ),
        )

    def check(self) -> None:
        if self.max_instructions is not None:
            _require(
                self.max_instructions >= 1, "max_instructions", f"got {self.max_instructions!r}; must be >= 1 or null"
            )
        _require(self.judge_max_chars >= 1, "judge_max_chars", f"got {self.judge_max_chars!r}; must be >= 1")


@dataclass(frozen=True)
class StepResources:
    cpu: int = 2
    memory: int = 8000  # MB
    gpu: int = 0

    def check(self) -> None:
        for name, least in (("cpu", 1), ("memory", 1), ("gpu", 0)):
            value = getattr(self, name)
            _require(value >= least, name, f"got {value!r}; must be >= {least}")


@dataclass(frozen=True)
class ResourcesConfig:
    """What each heavy step asks the scheduler for (flows/mutators.py adds @resources; local runs ignore it)."""

    train: StepResources = field(default_factory=StepResources)
    evaluate: StepResources = field(default_factory=StepResources)
    output_dir: str = "runs"  # where checkpoints and eval files go; shared storage when scaling out
    kubernetes: bool = False  # send the heavy steps to Kubernetes (flows/mutators.py)
    image: str | None = None
    nproc_per_node: int = 1
    serialize_cpu_steps: bool = True  # without a GPU, one heavy step at a time (parallel branches thrash cores)
    # with GPUs (local runs, not Kubernetes): steps that use them take turns on the machine, never share them
    serialize_gpu_steps: bool = True
    # how long a rank waits in a collective (checkpoint writes of big models included) before the job fails
    process_group_timeout_s: int = 1800

    def check(self) -> None:
        _require(self.nproc_per_node >= 1, "nproc_per_node", f"got {self.nproc_per_node!r}; must be >= 1")
        _require(
            self.process_group_timeout_s >= 1,
            "process_group_timeout_s",
            f"got {self.process_group_timeout_s!r}; must be >= 1 (seconds)",
        )


@dataclass(frozen=True)
class DeploymentConfig:
    schedule_cron: str | None = None  # 6-field AWS cron, e.g. "0 3 * * ? *"
    project: str = "prefflow"
    trigger_event: str | None = None

    def check(self) -> None:
        _require(
            bool(PROJECT_NAME.match(self.project)),
            "project",
            f"got {self.project!r}; use lowercase letters, digits and underscores",
        )
        if self.schedule_cron is not None:
            _require(
                len(self.schedule_cron.split()) == 6,
                "schedule_cron",
                f"got {self.schedule_cron!r}; use the 6-field AWS form, e.g. '0 3 * * ? *'",
            )


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    source: str = field(default="<dict>", compare=False, metadata=INTERNAL)  # the file, for error messages

    def to_dict(self) -> dict:
        return to_dict(self)


#: The top-level keys of a run config file.
SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if not f.metadata.get("internal")]
