"""fairseq2 recipe configs read into one shape, and the shape of what the import makes of them: the 2024 flat keys
and the 2025 ``_set_`` sections (``trainer``, ``regime``, ``optimizer.config``, ...) become the same canonical keys,
each remembering how its file spelt it, so the import maps every key once and says what it did with each."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from steps.config.convert import ConfigError, convert_value, short

#: 2025 section paths -> the 2024 flat name they mean (paths not listed keep their last part under the section).
SECTIONED = {
    "model.name": "model",
    "model.checkpoint": "model_checkpoint",
    "model.config": "model_config",
    "dataset.name": "dataset",
    "dataset.path": "dataset_path",
    "dataset.source_encode_mode": "src_encode_mode",
    "dataset.target_encode_mode": "tgt_encode_mode",
    "tokenizer.name": "tokenizer",
    "gang.tensor_parallel_size": "tensor_parallel_size",
    "gang.monitored": "monitored_gang",
    "trainer.fsdp.granularity": "fsdp_wrap_granularity",
    "trainer.fsdp.reshard_after_forward": "fsdp_reshard_after_forward",
    "criterion.name": "criterion",
    "criterion.config": "criterion_config",
    "optimizer.name": "optimizer",
    "lr_scheduler.name": "lr_scheduler",
    "regime.num_steps": "max_num_steps",
    "regime.num_data_epochs": "max_num_data_epochs",
    "common.seed": "seed",
    "common.assets.checkpoint_dir": "resume_checkpoint_dir",
}
#: 2025 section prefixes whose keys keep their flat name (``trainer.max_gradient_norm`` -> ``max_gradient_norm``).
FLAT_UNDER = ("dataset.", "trainer.", "regime.")
#: Values read whole, not key by key (a loss's fields, free-form dicts, fairseq2-internal sections).
OPAQUE = {
    "criterion_config",
    "criterion.config",
    "model_config",
    "model.config",
    "dataset.extras",
    "extras",
    "trainer.torch_compile",
    "common.torch",
    "common.metric_recorders",
    "common.profilers",
    "profile",
    "trainer.profile",
    "fp16_loss_scale",
    "trainer.fp16_loss_scale",
    "betas",
}
#: 2025 sections (any of them, or a ``_set_`` anywhere, marks the sectioned form).
SECTIONS_2025 = ("model", "dataset", "tokenizer", "gang", "trainer", "criterion", "optimizer", "lr_scheduler", "regime")


@dataclass(frozen=True)
class Note:
    """What the import did with one key: ``mapped``, ``changed`` (mapped; the meaning differs), ``not applicable``,
    ``unknown`` or ``to fill`` (the user must still give a value: the flow refuses the config until then)."""

    source: str
    key: str
    kind: str
    message: str

    def line(self) -> str:
        return f"{self.kind}: {self.source}: {self.key}: {self.message}"


@dataclass
class Conversion:
    """The PrefFlow run config (a YAML mapping, already checked) and the notes on every key not mapped as is."""

    config: dict
    notes: list[Note] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    mapped: dict[str, list[str]] = field(default_factory=dict)  # {file: its keys mapped as they are (no note)}

    def yaml(self) -> str:
        head = [
            "# PrefFlow run config converted from fairseq2 recipe configs by `python -m steps.config from-fairseq2`:",
            *(f"#   {s}" for s in self.sources),
            "# Sections fairseq2 does not describe (evaluation, resources beyond the GPUs) keep PrefFlow's defaults.",
            "# What changed in meaning, and what does not apply here:",
            *(f"#   {n.line()}" for n in self.notes),
        ]
        return "\n".join(head) + "\n" + yaml.safe_dump(self.config, sort_keys=False, width=120)


@dataclass
class Recipe:
    """One fairseq2 recipe file: ``values`` {canonical key: value}, ``spelling`` {canonical key: key in the file};
    keys are ``take``n as they are mapped, so whatever is left at the end was not."""

    source: str
    generation: str  # "2024" (flat keys) or "2025" (``_set_`` sections)
    values: dict[str, Any] = field(default_factory=dict)
    spelling: dict[str, str] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)

    @property
    def kind(self) -> str:
        """``preference`` (a preference_finetune config: it names a criterion) or ``sft`` (instruction_finetune)."""
        return "preference" if ("criterion" in self.values or "criterion_config" in self.values) else "sft"

    def has(self, key: str) -> bool:
        return key in self.values

    def take(self, key: str, default: Any = None) -> Any:
        """The value of canonical ``key`` (``default``, fairseq2's, when the file leaves it out), marked as mapped."""
        self.taken.add(key)
        return self.values.get(key, default)

    def key(self, canonical: str) -> str:
        """How the file spells ``canonical`` (its 2025 section path or its flat name)."""
        return self.spelling.get(canonical, canonical)

    def left(self) -> list[str]:
        """Keys of the file not mapped yet, in file order."""
        return [k for k in self.values if k not in self.taken]

    def error(self, canonical: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.key(canonical), message)


def _unset(value: Any) -> Any:
    """A 2025 section without its ``_set_``/``_del_`` wrappers: ``{_set_: {a: 1}, b: {_set_: {c: 2}}}`` ->
    ``{a: 1, b: {c: 2}}``."""
    if not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    if isinstance(value.get("_set_"), Mapping):
        out.update({str(k): _unset(v) for k, v in value["_set_"].items()})
    for k, v in value.items():
        if k in ("_set_", "_del_"):
            continue
        if isinstance(out.get(str(k)), Mapping) and isinstance(v, Mapping):
            out[str(k)] = {**out[str(k)], **_unset(v)}
        else:
            out[str(k)] = _unset(v)
    if value.get("_del_"):
        out["_del_"] = value["_del_"]
    return out


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and prefix not in OPAQUE:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def _canonical(path: str) -> str:
    if path in SECTIONED:
        return SECTIONED[path]
    for section in ("optimizer.config.", "lr_scheduler.config."):
        if path.startswith(section):
            return section.replace(".config.", "_config.") + path[len(section) :]
    if path.startswith(FLAT_UNDER) and path.count(".") == 1:
        return path.split(".", 1)[1]
    return path


def is_sectioned(data: Mapping) -> bool:
    """Whether a recipe mapping is in fairseq2's 2025 sectioned form."""
    return any(isinstance(v, Mapping) and (k in SECTIONS_2025 or "_set_" in v) for k, v in data.items())


def read_recipe(source: str, data: Any) -> Recipe:
    """A fairseq2 recipe mapping (either generation) as canonical keys; ConfigError for anything else."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, "", f"expected a fairseq2 recipe config (a mapping), got {short(data)}")
    flat: dict[str, Any] = {}
    if is_sectioned(data):
        recipe = Recipe(source, "2025")
        _flatten(_unset(data), "", flat)
    else:
        recipe = Recipe(source, "2024")
        for k, v in data.items():
            # the flat form's typed sub-configs are read key by key; _type_ names fairseq2's class
            if k in ("optimizer_config", "lr_scheduler_config") and isinstance(v, Mapping):
                for sub, subv in v.items():
                    flat[f"{k}.{sub}"] = subv
            else:
                flat[str(k)] = v
    for path, value in flat.items():
        canonical = _canonical(path)
        if canonical in recipe.values:
            raise ConfigError(source, path, f"sets {canonical!r} a second time (also as {recipe.key(canonical)!r})")
        recipe.values[canonical] = value
        recipe.spelling[canonical] = path
    return recipe


#: The guide's runs: one node of 8 GPUs (its sbatch and torchrun scripts).
GUIDE_NPROC_PER_NODE = 8
#: fairseq2's recipe defaults for keys a file leaves out (its 2024 recipe classes; 2025 differs where noted).
DEFAULTS: dict[str, Any] = {
    "model": "llama3_1_8b_instruct",
    "dtype": "bfloat16",
    "mixed_precision": "static",
    "data_parallelism": "fsdp",
    "activation_checkpointing": True,
    "max_seq_len": 8192,
    "max_num_tokens": 16384,
    "batch_size": None,
    "mask_source_tokens": True,
    "optimizer": "adamw",
    "optimizer_config.lr": 5.5e-6,
    "optimizer_config.betas": [0.9, 0.95],
    "optimizer_config.eps": 1e-8,
    "optimizer_config.weight_decay": 0.1,
    "lr_scheduler": "cosine-annealing",
    "lr_scheduler_config.cycle_len": None,
    "lr_scheduler_config.num_warmup_steps": 0,
    "lr_scheduler_config.cycle_mul": 1.0,
    "lr_scheduler_config.lr_mul": 1.0,
    "lr_scheduler_config.start_lr": 0.0,
    "gradient_accumulation": 1,
    "max_gradient_norm": None,
    "max_num_steps": 5000,
    "max_num_data_epochs": None,
    "checkpoint_every_n_steps": 1000,
    "keep_last_n_checkpoints": 1,
    "seed": 2,
    "criterion": "dpo",
}
#: Keys (or prefixes, ending in '.') with no PrefFlow counterpart, and why.
NOT_APPLICABLE = {
    "example_shuffle_window": "PrefFlow shuffles the whole training set each epoch (seeded), not in a window",
    "batch_shuffle_window": "PrefFlow shuffles the order of all batches each epoch (seeded), not in a window",
    "num_prefetch": "batches are built in memory before each epoch",
    "train_split": "PrefFlow's data step writes its own train/dev split (data.dev_fraction)",
    "valid_split": "PrefFlow's data step writes its own train/dev split (data.dev_fraction)",
    "max_num_valid_tokens": "dev batches use the same max_num_tokens as training",
    "min_seq_len": "PrefFlow drops no example for being short",
    "src_encode_mode": "prompts are rendered with the model's chat template (steps/chat), not fairseq2 encode modes",
    "tgt_encode_mode": "responses are rendered with the model's chat template (steps/chat), not fairseq2 encode modes",
    "family": "PrefFlow reads its own prepared JSONL, not a fairseq2 dataset family",
    "extras": "fairseq2 dataset-family options",
    "chat_mode": "prompts are rendered with the model's chat template (steps/chat)",
    "model_config": "model config overrides are not applied: the Hugging Face model's own config is used",
    "model.family": "the Hugging Face model id says the family",
    "model.arch": "the Hugging Face model id says the architecture",
    "tokenizer": "the tokenizer that ships with the Hugging Face model is used",
    "fsdp_wrap_granularity": "parallelism: fsdp shards each decoder layer (fairseq2's 'layer') plus a root",
    "fsdp_reshard_after_forward": "FSDP2's default, reshard after forward, is what PrefFlow uses",
    "trainer.fsdp.": "PrefFlow's FSDP2 setup is fixed (per-layer shards, gradients reduced in fp32 master dtype)",
    "tensor_parallel_size": "PrefFlow has no tensor parallelism (FSDP shards the weights instead)",
    "torch_compile": "PrefFlow does not torch.compile the model",
    "fp16_loss_scale": "PrefFlow trains in fp32 or bf16, which need no loss scaling",
    "keep_last_n_models": "each run hands one final model directory to evaluation",
    "publish_metrics_every_n_steps": "PrefFlow logs every step to metrics.jsonl",
    "publish_metrics_every_n_data_epochs": "PrefFlow logs every step to metrics.jsonl",
    "validate_after_n_steps": "dev evaluation runs after every epoch (dev_every_epoch) and at the end",
    "validate_every_n_steps": "dev evaluation runs after every epoch (dev_every_epoch) and at the end",
    "checkpoint_every_n_data_epochs": "PrefFlow checkpoints at the end of every epoch",
    "resume_checkpoint_dir": "fairseq2's checkpoint directory of the SFT run: PrefFlow hands the SFT model to the "
    "preference runs itself (init/reference: sft)",
    "profile": "no profiler hook",
    "monitored_gang": "no monitored barriers",
    "anomaly_detection": "autograd anomaly detection is not switched on",
    "wandb_project": "PrefFlow records runs in Metaflow and reports/, not W&B",
    "wandb_run_name": "PrefFlow records runs in Metaflow and reports/, not W&B",
    "optimizer_config._type_": "names fairseq2's AdamWConfig; PrefFlow's optimizer is AdamW",
    "optimizer_config.amsgrad": "PrefFlow's AdamW is plain AdamW",
    "optimizer_config.maximize": "PrefFlow minimises the loss",
    "optimizer_config.capturable": "a torch AdamW implementation switch",
    "optimizer_config.differentiable": "a torch AdamW implementation switch",
    "optimizer_config.impl": "PrefFlow picks fused AdamW on GPU",
    "optimizer_config.use_fp32": "AdamW state is kept in model.master_dtype (float32 by default)",
    "lr_scheduler_config._type_": "names fairseq2's scheduler config class (lr_scheduler says which)",
    "gang.": "process-group settings; torchrun and torch.distributed defaults are used",
    "common.": "fairseq2 runtime settings (metric recorders, profilers, torch flags, asset paths)",
    "regime.": "fairseq2 regime bookkeeping with no PrefFlow counterpart",
    "trainer.": "fairseq2 trainer switches with no PrefFlow counterpart",
    "gc_every_n_steps": "Python's garbage collector is left to itself",
    "gradient_check": "no gradient check between ranks",
    "_del_": "a fairseq2 override directive: those keys keep PrefFlow's values",
}


def typed(recipe: Recipe, key: str, tp: Any, default: Any = None) -> Any:
    """``recipe.take(key)`` as type ``tp`` (fairseq2's ``default`` when left out); ConfigError naming file and key."""
    try:
        return convert_value(recipe.take(key, default), tp, recipe.key(key))
    except ConfigError as exc:
        raise exc.located(recipe.source) from None


#: Keys whose fairseq2 default the import says it used when a file leaves them out.
SAID_DEFAULTS = (
    "optimizer_config.lr",
    "gradient_accumulation",
    "max_gradient_norm",
    "max_num_steps",
    "max_num_data_epochs",
    "seed",
    "max_seq_len",
    "max_num_tokens",
)


def not_applicable(key: str) -> str | None:
    """Why ``key`` (canonical or as spelt) has no PrefFlow counterpart, or None when it has one."""
    if key in NOT_APPLICABLE:
        return NOT_APPLICABLE[key]
    return next((why for k, why in NOT_APPLICABLE.items() if k.endswith(".") and key.startswith(k)), None)
