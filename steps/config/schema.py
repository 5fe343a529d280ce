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
from steps.config.fairseq2_names import criterion_fields, loss_class_of
from steps.config.overrides import set_path
from steps.evaluate.settings import GenerationSettings
from steps.models import DEFAULT_MODEL

#: How far above lr a final_lr may rise (fairseq2's own examples rise 1.8x): beyond it, surely a typo.
MAX_LR_RISE = 1000.0
#: More epochs than any run needs; the loop plans every epoch's batches, so 10**30 would never start.
MAX_EPOCHS = 100_000
#: Metaflow's rule for @project names.
PROJECT_NAME = re.compile(r"^[a-z0-9_]+$")


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError("", key, message)


@dataclass(frozen=True)
class DataConfig:
    """Data preparation (see steps.data.prepare.prepare_data): one reader per format, the same files out."""

    format: Literal["oasst", "preference", "hh_rlhf", "ultrafeedback", "fairseq2"] = "oasst"
    input: str = "embedded"  # "embedded" (oasst only), a Hub id, a JSONL(.gz)/Parquet file, or a directory
    split: str | None = None  # None: the format's training split (train; train_prefs for UltraFeedback)
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

    #: settings that only OpenAssistant trees have
    OASST_ONLY = (
        "langs",
        "pair_strategy",
        "sft_rank",
        "tree_states",
        "include_synthetic",
        "include_deleted",
        "require_review",
        "max_trees",
    )

    def check(self) -> None:
        _require(0 <= self.dev_fraction < 1, "dev_fraction", f"got {self.dev_fraction!r}; must be in [0, 1)")
        _require(self.sft_rank >= 0, "sft_rank", f"got {self.sft_rank!r}; must be >= 0")
        if self.format != "oasst":
            _require(
                self.input != "embedded",
                "input",
                f"the embedded sample is OpenAssistant data; with format {self.format} give a Hub id, a file or a "
                "directory",
            )
            defaults = DataConfig()
            for name in self.OASST_ONLY:
                _require(
                    getattr(self, name) == getattr(defaults, name),
                    name,
                    f"is an OpenAssistant setting; it has no effect with format {self.format}: remove it",
                )


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
        config, section = loss_config(self.criterion, self.criterion_config, "preference.criterion_config")
        object.__setattr__(self, "criterion_config", config)
        for name, (fairseq2_field, value) in section.items():
            _require(
                getattr(self, name) in ("auto", value),
                f"criterion_config.{fairseq2_field}",
                f"sets {name} to {value!r}, but {name} is {getattr(self, name)!r}: give only one of them",
            )
            object.__setattr__(self, name, value)

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


def loss_config(criterion: str, raw: Any, label: str = "criterion_config") -> tuple[Any, dict[str, tuple[str, Any]]]:
    """fairseq2's ``criterion_config`` (a mapping, optionally with ``_type_``) as the loss's config dataclass, and
    the preference-section keys its fairseq2-only fields set ({key: (fairseq2 field, value)})."""
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        cls = loss_class_of(criterion)
        _require(
            isinstance(raw, cls),
            "criterion_config",
            f"is a {type(raw).__qualname__}, which does not match criterion {criterion!r} "
            f"({cls.__module__}.{cls.__qualname__})",
        )
        return raw, {}
    parts = criterion_fields(criterion, raw, label)
    return build(parts.cls, parts.fields, "criterion_config"), parts.section


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
    fresh = loss != section.criterion
    where = f"preference.per_loss.{loss}" if loss in section.per_loss else "preference"
    parts = criterion_fields(loss, cc_raw, f"{where}.criterion_config", defaults=fresh)
    for name, (fairseq2_field, value) in parts.section.items():
        _require(
            merged.setdefault(name, value) == value,
            f"criterion_config.{fairseq2_field}",
            f"sets {name} to {value!r}, but {name} is {merged[name]!r}: give only one of them",
        )
    kwargs = convert_fields(PreferenceConfig, merged)
    cc: Any
    if fresh:
        cc = build(parts.cls, parts.fields, "criterion_config")
    elif parts.fields:
        base = section.criterion_config
        changes = convert_fields(type(base), parts.fields, "criterion_config")
        cc = construct(lambda: dataclasses.replace(base, **changes), "criterion_config")
    else:
        cc = section.criterion_config  # the same object: no rebuild on the way to the loss
    resolved = construct(
        lambda: dataclasses.replace(section, criterion=loss, criterion_config=cc, per_loss={}, **kwargs), ""
    )
    return checked(resolved, label=where)


@dataclass(frozen=True)
class EvaluationConfig:
    """AlpacaEval 2 settings; the generation knobs are validated once, as ``generation`` (GenerationSettings)."""

    enabled: bool = True
    eval_set: str = "embedded"  # "embedded" | "alpaca_eval" (Hub) | path to a JSON eval set
    max_instructions: int | None = None
    reference: str = "auto"  # auto: the eval set's outputs if present, else generated by the base model
    judge: str = "local_logprob"  # or "alpaca_eval:<annotator config>", or "openai_compatible" (a served model)
    judge_model: str = DEFAULT_MODEL  # local judge: a model spec; openai_compatible: the served model's name
    judge_max_chars: int = 1500
    judge_base_url: str | None = None  # openai_compatible: e.g. http://localhost:8000/v1 (vLLM serve)
    judge_api_key_env: str | None = None  # the NAME of the variable holding the key; null sends none
    judge_max_requests: int | None = None  # request budget per evaluation (null: twice the pairs plus 10)
    judge_timeout_s: float = 120.0
    judge_concurrency: int = 4
    heldout_preference: bool = True  # accuracy on the dev preference pairs, no judge needed
    heldout_max_pairs: int | None = None
    agreement_registry: str | None = None  # where `python -m steps.evaluate agreement` records judge agreement
    paired_baseline: str | None = "sft"  # each row's paired WR difference from this variant (null: none)
    paired_resamples: int = 10000
    paired_seed: int = 0
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
        served = self.judge == "openai_compatible" or self.judge.startswith("openai_compatible:")
        if served:
            _require(
                self.judge_base_url is not None,
                "judge_base_url",
                "judge openai_compatible needs the server's URL, e.g. http://localhost:8000/v1",
            )
            _require(
                ":" in self.judge or not self.judge_model.startswith(("embedded:", "tiny")),
                "judge_model",
                f"got {self.judge_model!r}; with openai_compatible name the served model, "
                "e.g. meta-llama/Llama-3.1-70B-Instruct",
            )
        if self.judge_base_url is not None:
            _require(
                self.judge_base_url.startswith(("http://", "https://")),
                "judge_base_url",
                f"got {self.judge_base_url!r}; must start with http:// or https://",
            )
        if self.judge_api_key_env is not None:
            _require(
                re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.judge_api_key_env) is not None,
                "judge_api_key_env",
                "must be the NAME of an environment variable (e.g. JUDGE_API_KEY), never the key itself",
            )
        for name in ("judge_max_requests", "heldout_max_pairs"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, f"got {value!r}; must be >= 1 or null")
        _require(self.judge_timeout_s > 0, "judge_timeout_s", f"got {self.judge_timeout_s!r}; must be > 0")
        _require(self.judge_concurrency >= 1, "judge_concurrency", f"got {self.judge_concurrency!r}; must be >= 1")
        _require(self.paired_resamples >= 100, "paired_resamples", f"got {self.paired_resamples!r}; must be >= 100")

    def judge_options(self) -> dict[str, Any]:
        """The judge knobs as make_judge / evaluate_model take them (one place that spells them)."""
        return {
            "judge_model": self.judge_model,
            "judge_max_chars": self.judge_max_chars,
            "judge_base_url": self.judge_base_url,
            "judge_api_key_env": self.judge_api_key_env,
            "judge_max_requests": self.judge_max_requests,
            "judge_timeout_s": self.judge_timeout_s,
            "judge_concurrency": self.judge_concurrency,
        }


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
class TrackingConfig:
    """Experiment trackers that every training and evaluation metric goes to (steps/tracking.py)."""

    backends: list[str] = field(default_factory=list)  # any of tensorboard, mlflow, wandb; [] = metrics.jsonl only
    project: str = "prefflow"  # W&B project (WANDB_PROJECT overrides) and MLflow experiment

    def check(self) -> None:
        from steps.tracking import BACKENDS

        for i, name in enumerate(self.backends):
            _require(name in BACKENDS, f"backends[{i}]", f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        _require(len(set(self.backends)) == len(self.backends), "backends", f"lists a backend twice: {self.backends}")
        _require(bool(self.project.strip()), "project", "must not be empty")


@dataclass(frozen=True)
class PushToHubConfig:
    """Upload trained models with their cards to the Hugging Face Hub (steps/hub.py); token from HF_TOKEN."""

    repo_id: str | None = None  # "owner/name", may use {variant} and {run_id}; None: no upload
    private: bool = True
    variants: list[str] | None = None  # which variants to upload; None: every one
    dry_run: bool = False  # check and list the files, upload nothing

    def check(self) -> None:
        if self.repo_id is not None:
            from steps.hub import PublishError, repo_id_for

            try:
                repo_id_for(self.repo_id, "sft", "0")
            except PublishError as exc:
                raise ConfigError("", "repo_id", str(exc).removeprefix("push_to_hub.repo_id: ")) from exc


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    push_to_hub: PushToHubConfig = field(default_factory=PushToHubConfig)
    source: str = field(default="<dict>", compare=False, metadata=INTERNAL)  # the file, for error messages

    def to_dict(self) -> dict:
        return to_dict(self)


#: The top-level keys of a run config file.
SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if not f.metadata.get("internal")]
