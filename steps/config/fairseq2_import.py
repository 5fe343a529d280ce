"""fairseq2 ``instruction_finetune`` / ``preference_finetune`` recipe configs -> one PrefFlow run config. Every
key is mapped (a note says what changed where fairseq2's meaning differs) or listed as not applicable with the
reason; keys a file leaves out take fairseq2's defaults. ``python -m steps.config from-fairseq2 --help``."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

from steps.config.convert import ConfigError, convert_value, short
from steps.config.fairseq2_losses import FAIRSEQ2_LOSSES, read_criterion_config
from steps.config.fairseq2_names import SFT, model_spec, reference_spec
from steps.config.fairseq2_recipes import (
    DEFAULTS,
    GUIDE_NPROC_PER_NODE,
    SAID_DEFAULTS,
    Conversion,
    Note,
    Recipe,
    not_applicable,
    read_recipe,
    typed,
)
from steps.config.loading import config_from_dict, parse_yaml_text, read_config_text

T = TypeVar("T")
OPENASSISTANT2 = re.compile(r"(openassistant2|oasst2?)", re.IGNORECASE)
#: What the import checks its config with where the user must still give model.base (never written).
STAND_IN = "your-org/your-sft-model"


def _located(recipe: Recipe, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with its ConfigError attributed to the recipe's file."""
    try:
        return fn(*args)
    except ConfigError as exc:
        raise exc.located(recipe.source) from None


def _dtype(recipe: Recipe) -> tuple[str, str]:
    """(compute dtype, master dtype): fairseq2's ``dtype`` under mixed precision is the compute dtype over fp32
    master weights, PrefFlow's ``model.dtype`` / ``model.master_dtype``; without mixed precision both are ``dtype``."""
    dtype = str(recipe.take("dtype", DEFAULTS["dtype"])).removeprefix("torch.")
    mixed = str(recipe.take("mixed_precision", DEFAULTS["mixed_precision"]))
    if dtype not in ("float32", "bfloat16", "float16"):
        raise recipe.error("dtype", f"got {dtype!r}; expected float32, bfloat16 or float16")
    if dtype == "float16":
        return "bfloat16", "float32"  # noted by the caller: PrefFlow trains without fp16 loss scaling
    if dtype == "float32" or mixed in ("none", "off"):
        return dtype, dtype
    return dtype, "float32"


class _Converter:
    def __init__(self, nproc_per_node: int) -> None:
        self.nproc = nproc_per_node
        self.notes: list[Note] = []
        self.base: str | None = None
        self.has_sft = False

    def note(self, recipe: Recipe, canonical: str, kind: str, message: str) -> None:
        self.notes.append(Note(recipe.source, recipe.key(canonical), kind, message))

    def train(self, recipe: Recipe) -> dict[str, Any]:
        """The TrainConfig keys of one recipe, in fairseq2's meaning."""
        out: dict[str, Any] = {}
        if str(recipe.take("optimizer", DEFAULTS["optimizer"])) != "adamw":
            raise recipe.error("optimizer", f"got {recipe.values['optimizer']!r}; PrefFlow trains with AdamW only")
        left_out = [f"{k}={DEFAULTS[k]!r}" for k in SAID_DEFAULTS if not recipe.has(k)]
        if left_out:
            self.note(recipe, "(keys left out)", "changed", f"fairseq2's defaults: {', '.join(left_out)}")
        lr = out["lr"] = typed(recipe, "optimizer_config.lr", float, DEFAULTS["optimizer_config.lr"])
        out["betas"] = list(
            typed(recipe, "optimizer_config.betas", tuple[float, float], DEFAULTS["optimizer_config.betas"])
        )
        out["weight_decay"] = typed(
            recipe, "optimizer_config.weight_decay", float, DEFAULTS["optimizer_config.weight_decay"]
        )
        if recipe.has("optimizer_config.weight_decay"):
            self.note(
                recipe,
                "optimizer_config.weight_decay",
                "changed",
                "PrefFlow does not decay 1-D parameters "
                "(biases, norm weights); fairseq2's AdamW decays every parameter",
            )
        if typed(recipe, "optimizer_config.eps", float, 1e-8) != 1e-8:
            self.note(recipe, "optimizer_config.eps", "changed", "PrefFlow's AdamW uses eps 1e-8")
        self._schedule(recipe, out, lr)
        accum = typed(recipe, "gradient_accumulation", int, DEFAULTS["gradient_accumulation"])
        out["grad_accum"] = accum  # per rank in both: a step is nproc_per_node x grad_accum micro-batches
        out["max_grad_norm"] = typed(recipe, "max_gradient_norm", float | None, DEFAULTS["max_gradient_norm"])
        steps = typed(recipe, "max_num_steps", int | None, DEFAULTS["max_num_steps"])
        out["max_steps"] = steps
        epochs = typed(recipe, "max_num_data_epochs", int | None, DEFAULTS["max_num_data_epochs"])
        if epochs is None:
            if steps is None:
                raise recipe.error("max_num_steps", "null with max_num_data_epochs null: the run would never end")
            epochs = steps
            self.note(
                recipe,
                "max_num_data_epochs",
                "changed",
                f"null (run to max_num_steps): epochs: {steps}, "
                f"at least one step each, so max_steps {steps} ends the run",
            )
        out["epochs"] = epochs
        out["seed"] = typed(recipe, "seed", int, DEFAULTS["seed"])
        self._batches(recipe, out)
        every = typed(recipe, "checkpoint_every_n_steps", int | None, DEFAULTS["checkpoint_every_n_steps"])
        out["checkpoint_every_steps"] = every
        keep = typed(recipe, "keep_last_n_checkpoints", int | None, DEFAULTS["keep_last_n_checkpoints"])
        if keep is None:
            keep = 1
            self.note(
                recipe,
                "keep_last_n_checkpoints",
                "changed",
                "null (keep all) -> 1: PrefFlow's checkpoints "
                "are for resuming; each run's model is handed on as its own directory",
            )
        out["keep_checkpoints"] = keep
        parallelism = str(recipe.take("data_parallelism", DEFAULTS["data_parallelism"]))
        if parallelism not in ("ddp", "fsdp"):
            raise recipe.error("data_parallelism", f"got {parallelism!r}; PrefFlow has ddp and fsdp")
        out["parallelism"] = parallelism
        return out

    def _schedule(self, recipe: Recipe, out: dict[str, Any], lr: float) -> None:
        name = recipe.take("lr_scheduler", DEFAULTS["lr_scheduler"])
        warmup = typed(recipe, "lr_scheduler_config.num_warmup_steps", int, 0)
        out["warmup_steps"] = warmup
        if warmup:
            self.note(
                recipe,
                "lr_scheduler_config.num_warmup_steps",
                "changed",
                "PrefFlow's warmup takes "
                "(step+1)/(warmup+1) of lr, so no step runs at lr 0; fairseq2 ramps from start_lr",
            )
        if name in (None, "none"):
            out["schedule"] = "constant"
            return
        if name not in ("cosine-annealing", "cosine_annealing", "polynomial-decay", "polynomial_decay"):
            raise recipe.error("lr_scheduler", f"got {name!r}; PrefFlow converts cosine-annealing and polynomial-decay")
        cosine = name.startswith("cosine")
        out["schedule"] = "cosine" if cosine else "linear"
        final = typed(recipe, "lr_scheduler_config.final_lr", float | None)
        scale = typed(recipe, "lr_scheduler_config.final_lr_scale", float | None)
        if final is not None and scale is not None:
            raise recipe.error("lr_scheduler_config.final_lr", "final_lr and final_lr_scale are both set; keep one")
        if final is None:
            final = lr * scale if scale is not None else (lr * 0.2 if recipe.generation == "2025" else 1.1e-6)
        out["final_lr"] = float(final)
        cycle_key = "lr_scheduler_config.cycle_len" if cosine else "lr_scheduler_config.num_steps"
        cycle = typed(recipe, cycle_key, int | None)
        if cycle is None:
            steps = convert_value(recipe.values.get("max_num_steps", DEFAULTS["max_num_steps"]), int | None, "")
            if steps is None:
                raise recipe.error(cycle_key, "null needs max_num_steps (fairseq2's rule)")
            cycle = steps - warmup
            self.note(
                recipe,
                "lr_scheduler_config.cycle_len",
                "changed",
                f"null: fairseq2's cycle is max_num_steps - "
                f"num_warmup_steps = {cycle} steps; schedule_cycle_steps: {cycle} keeps it, so a run that ends "
                "earlier on epochs stops part-way down the cosine, as in fairseq2",
            )
        out["schedule_cycle_steps"] = cycle
        if not cosine and typed(recipe, "lr_scheduler_config.power", float, 1.0) != 1.0:
            raise recipe.error("lr_scheduler_config.power", "PrefFlow's linear schedule is polynomial decay of power 1")
        for key in ("lr_scheduler_config.cycle_mul", "lr_scheduler_config.lr_mul"):
            if typed(recipe, key, float, 1.0) != 1.0:
                self.note(
                    recipe,
                    key,
                    "changed",
                    "PrefFlow repeats the first cycle unchanged: this differs only after the first cycle",
                )
        if typed(recipe, "lr_scheduler_config.start_lr", float, 0.0) != 0.0 and warmup:
            self.note(recipe, "lr_scheduler_config.start_lr", "changed", "warmup starts at lr/(warmup+1) here")

    def _batches(self, recipe: Recipe, out: dict[str, Any]) -> None:
        out["max_seq_len"] = typed(recipe, "max_seq_len", int, DEFAULTS["max_seq_len"])
        out["max_num_tokens"] = typed(recipe, "max_num_tokens", int, DEFAULTS["max_num_tokens"])
        out["overlength"] = "drop"  # fairseq2 skips examples over max_seq_len
        out["mask_source_tokens"] = typed(recipe, "mask_source_tokens", bool, DEFAULTS["mask_source_tokens"])
        pairs = recipe.kind == "preference"
        self.note(
            recipe,
            "max_num_tokens",
            "changed",
            "a micro-batch on one GPU in both; PrefFlow counts padded rows x the longest row"
            + (" (2 rows per pair), fairseq2 prompt+chosen+prompt+rejected per pair" if pairs else ", fairseq2")
            + " in length buckets: about the same budget, PrefFlow's batches can be a little smaller",
        )
        if pairs:
            self.note(
                recipe,
                "max_seq_len",
                "changed",
                "fairseq2 (since Aug 2024) drops a pair whose chosen and "
                "rejected sequences together exceed it; PrefFlow drops one whose longer sequence does: the "
                "same value keeps every pair fairseq2 keeps, and some longer ones",
            )
        size = typed(recipe, "batch_size", int | None, DEFAULTS["batch_size"])
        if size is not None:
            out["max_batch_examples"] = size
            out["max_num_tokens"] = size * out["max_seq_len"] * (2 if pairs else 1)
            self.note(
                recipe,
                "batch_size",
                "changed",
                f"{size} examples per micro-batch: max_batch_examples {size}, "
                "max_num_tokens raised so that it never binds",
            )

    def model(self, recipe: Recipe) -> str:
        """The spec of a recipe's ``model`` (checkpoint names: ``sft``)."""
        if recipe.has("model_checkpoint"):
            spec, what = _located(
                recipe, model_spec, str(recipe.take("model_checkpoint")), recipe.key("model_checkpoint")
            )
            self.note(recipe, "model_checkpoint", "changed", f"{what}; PrefFlow loads Hugging Face directories")
            recipe.take("model")
            return spec
        spec, what = _located(recipe, model_spec, recipe.take("model", DEFAULTS["model"]), recipe.key("model"))
        if not recipe.has("model"):
            self.note(recipe, "model", "changed", f"left out: fairseq2's default {DEFAULTS['model']!r}; {what}")
        elif spec != SFT or self.has_sft:  # a lone recipe's checkpoint is model.base: lone_preference_base said so
            self.note(recipe, "model", "changed" if spec == SFT else "mapped", what)
        return spec

    def preference(self, recipe: Recipe) -> dict[str, Any]:
        from steps import losses

        criterion = str(recipe.take("criterion", DEFAULTS["criterion"]))
        names = FAIRSEQ2_LOSSES.get(criterion) if criterion in losses.registered_losses() else None
        if names is None:
            raise recipe.error("criterion", f"got {criterion!r}; fairseq2's criteria are {', '.join(FAIRSEQ2_LOSSES)}")
        raw = recipe.take("criterion_config") or {}
        if not isinstance(raw, Mapping):
            raise recipe.error("criterion_config", f"got {short(raw)}; expected a mapping")
        raw = {"_type_": names.class_names[0], **raw}  # the 2025 form has no _type_: it is fairseq2's all the same
        try:
            parts = read_criterion_config(criterion, raw)
        except ConfigError as exc:
            raise ConfigError(
                recipe.source, exc.key.replace("criterion_config", recipe.key("criterion_config"), 1), exc.message
            ) from None
        for key, message in parts.notes:
            kind = "not applicable" if "no effect here" in message else "changed"
            self.notes.append(
                Note(recipe.source, key.replace("criterion_config", recipe.key("criterion_config"), 1), kind, message)
            )
        out = {**self.train(recipe), "criterion": criterion, "criterion_config": parts.fields}
        out["init"] = self._relative(self.model(recipe), recipe, "model")
        if losses.requires_reference(criterion):
            field_name, value = parts.section.get("reference", ("reference_model", DEFAULTS["model"]))
            spec, what = _located(recipe, reference_spec, field_name, value, recipe.key("criterion_config"))
            if spec == SFT and not self.has_sft:
                what = f"{value!r} is the SFT checkpoint, the model.base of this run ('base')"
            if "reference" not in parts.section:
                what = f"left out: fairseq2's default {DEFAULTS['model']!r}; {what}"
            self.note(recipe, "criterion_config", "changed", f"{field_name} -> reference: {what}")
            out["reference"] = self._relative(spec, recipe, "criterion_config")
        return out

    def _relative(self, spec: str, recipe: Recipe, key: str) -> str:
        """``spec`` as the preference section names it: the base model is ``base``; without an SFT recipe the SFT
        checkpoint is the base model (``--sft-model``, or the name the user must replace)."""
        if spec == SFT and not self.has_sft:
            return "base"
        return "base" if spec == self.base else spec

    def lone_preference_base(self, recipe: Recipe, sft_model: str | None) -> str:
        """``model.base`` of a preference recipe imported without its instruction_finetune recipe: its model when
        that is a model; when it names fairseq2's SFT checkpoint, ``sft_model`` (that checkpoint's Hugging Face
        directory) or, without one, the checkpoint name, which the flow refuses until the user replaces it."""
        name = recipe.values.get("model", DEFAULTS["model"])
        spec = _located(recipe, model_spec, name, recipe.key("model"))[0]
        if spec != SFT:
            if sft_model is not None:
                raise ConfigError("--sft-model", sft_model, f"{recipe.source} starts from {name!r}, not a checkpoint")
            return spec
        if sft_model is not None:
            self.note(
                recipe,
                "model",
                "changed",
                f"{name!r} is the SFT checkpoint of an earlier fairseq2 run: model.base is its Hugging Face "
                f"directory {sft_model} (--sft-model); sft.enabled false, preference init and reference: base",
            )
            return sft_model
        self.note(
            recipe,
            "model",
            "to fill",
            f"{name!r} is the SFT checkpoint of an earlier fairseq2 run, which PrefFlow cannot load: replace "
            f"model.base ({name}) with its Hugging Face directory, or import again with --sft-model DIR; the flow "
            "refuses the config until then",
        )
        return str(name)


def convert_recipes(
    recipes: Sequence[tuple[str, Any]], nproc_per_node: int = GUIDE_NPROC_PER_NODE, sft_model: str | None = None
) -> Conversion:
    """One PrefFlow run config from fairseq2 recipe mappings [(source, mapping)]: at most one instruction_finetune
    recipe (-> ``sft``) and any preference_finetune recipes (the first -> ``preference``, the others ->
    ``preference.per_loss``). Without an instruction_finetune recipe, a preference recipe whose model is fairseq2's
    SFT checkpoint starts from ``sft_model`` (that checkpoint as a Hugging Face directory). ConfigError (naming the
    file and key) when something cannot be converted."""
    if nproc_per_node < 1:
        raise ConfigError("--nproc-per-node", "", f"got {nproc_per_node}; must be >= 1")
    read = [read_recipe(source, data) for source, data in recipes]
    sfts = [r for r in read if r.kind == "sft"]
    prefs = [r for r in read if r.kind == "preference"]
    if len(sfts) > 1:
        raise ConfigError(sfts[1].source, "", f"a second instruction_finetune recipe (the first: {sfts[0].source})")
    if not read:
        raise ConfigError("from-fairseq2", "", "no recipe files given")
    if sft_model is not None:
        sft_model = hf_directory(sft_model, sfts[0].source if sfts else None)
    conv = _Converter(nproc_per_node)
    first = sfts[0] if sfts else prefs[0]
    conv.has_sft = bool(sfts)
    if sfts:
        conv.base = conv.model(first)
        if conv.base == SFT:
            raise first.error("model", "an instruction_finetune recipe must start from a model, not a checkpoint")
    else:
        conv.base = conv.lone_preference_base(first, sft_model)
    config: dict[str, Any] = {"name": "from_fairseq2"}
    dtypes = {r.source: _dtype(r) for r in read}
    flags = [typed(r, "activation_checkpointing", bool, DEFAULTS["activation_checkpointing"]) for r in read]
    checkpointing = any(flags)  # every file's flag is read (and so mapped), not just the first true one
    compute, master = dtypes[first.source]
    config["model"] = {
        "base": conv.base,
        "dtype": compute,
        "master_dtype": master,
        "gradient_checkpointing": checkpointing,
    }
    for r in read:
        if str(r.values.get("dtype", "bfloat16")).removeprefix("torch.") == "float16":
            conv.note(r, "dtype", "changed", "float16 needs loss scaling, which PrefFlow does not do: bfloat16 compute")
        if dtypes[r.source] != dtypes[first.source]:
            conv.note(r, "dtype", "changed", f"one model.dtype per run: {dtypes[first.source]} (from {first.source})")
    data = _data(read, conv)
    if data:
        config["data"] = data
    config["sft"] = {"enabled": True, "init": "base", **conv.train(sfts[0])} if sfts else {"enabled": False}
    if prefs:
        section = conv.preference(prefs[0])
        per_loss: dict[str, dict] = {}
        for r in prefs[1:]:
            other = conv.preference(r)
            if other["criterion"] == section["criterion"] or other["criterion"] in per_loss:
                raise r.error("criterion", f"{other['criterion']!r} comes twice; give each loss one recipe")
            per_loss[other.pop("criterion")] = {k: v for k, v in other.items() if section.get(k) != v}
        config["preference"] = {**section, **({"per_loss": per_loss} if per_loss else {})}
    config["resources"] = {"nproc_per_node": nproc_per_node, "train": {"gpu": nproc_per_node}}
    for r in read:
        _leftovers(r, conv)
    noted = {(n.source, n.key) for n in conv.notes}
    mapped = {r.source: [r.key(k) for k in r.values if (r.source, r.key(k)) not in noted] for r in read}
    sources = [f"{r.source} ({r.kind}, {r.generation} form)" for r in read]
    to_fill = any(n.kind == "to fill" for n in conv.notes)
    return Conversion(_checked(config, to_fill), conv.notes, sources, mapped)


def hf_directory(path: str, sft_recipe: str | None) -> str:
    """``--sft-model``: a Hugging Face model directory (absolute), for a run without an instruction_finetune recipe."""
    if sft_recipe is not None:
        raise ConfigError("--sft-model", path, f"the SFT model is trained from {sft_recipe} here: leave one out")
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise ConfigError(
            "--sft-model",
            path,
            "not a Hugging Face model directory (no config.json): give the directory save_pretrained wrote "
            "(export a fairseq2 checkpoint to Hugging Face format first)",
        )
    return str(directory.resolve())


def _data(read: Sequence[Recipe], conv: _Converter) -> dict[str, Any]:
    """The data section from the recipes' dataset names (the guide's OpenAssistant-2 sets -> the Hub dataset)."""
    out: dict[str, Any] = {}
    for r in read:
        for key in ("dataset", "dataset_path"):
            if not r.has(key):
                continue
            value = r.take(key)
            if value is not None and OPENASSISTANT2.search(str(value)):
                out["input"] = "OpenAssistant/oasst2"
                conv.note(
                    r,
                    key,
                    "changed",
                    f"{value!r}: the guide's OpenAssistant-2 data -> data.input "
                    "OpenAssistant/oasst2, prepared by PrefFlow's data step (steps/data)",
                )
            elif value is not None:
                conv.note(
                    r,
                    key,
                    "not applicable",
                    f"{value!r}: a fairseq2 dataset asset; set data.input to the "
                    "data PrefFlow should prepare (see steps/data)",
                )
    return out


#: Why a lone preference recipe's SFT checkpoint directory is not read (with an SFT recipe: NOT_APPLICABLE's note).
LONE_CHECKPOINT_DIR = (
    "the fairseq2 checkpoint directory of the earlier SFT run: PrefFlow loads Hugging Face directories; export the "
    "checkpoint and pass that directory as --sft-model DIR"
)


def _leftovers(recipe: Recipe, conv: _Converter) -> None:
    for key in recipe.left():
        lone = key == "resume_checkpoint_dir" and not conv.has_sft
        why = LONE_CHECKPOINT_DIR if lone else not_applicable(key) or not_applicable(recipe.key(key))
        if why is not None:
            conv.note(recipe, key, "not applicable", why)
        else:
            conv.note(
                recipe,
                key,
                "unknown",
                f"{short(recipe.values[key])}: not a fairseq2 key this import knows; not converted",
            )
        recipe.take(key)


def _checked(config: dict, to_fill: bool = False) -> dict:
    """``config`` after PrefFlow's own validation: the run config and every loss's resolved section (``to_fill``:
    with a stand-in for the model.base the user must give)."""
    from steps.config.plan import plan_variants

    source = "from-fairseq2 (the converted config)"
    checked = {**config, "model": {**config["model"], "base": STAND_IN}} if to_fill else config
    cfg = config_from_dict(checked, source)
    losses = [cfg.preference.criterion, *cfg.preference.per_loss] if "preference" in config else []
    try:
        plan_variants(cfg, ",".join(losses) or "sft")
    except ConfigError as exc:
        raise exc.located(source) from None
    return config


def convert_files(
    paths: Sequence[str | PathLike], nproc_per_node: int = GUIDE_NPROC_PER_NODE, sft_model: str | None = None
) -> Conversion:
    """``convert_recipes`` for YAML files."""
    recipes = [(str(p), parse_yaml_text(read_config_text(p), str(p))) for p in paths]
    return convert_recipes(recipes, nproc_per_node, sft_model)
