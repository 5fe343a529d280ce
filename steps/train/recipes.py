"""SFT and preference training runs: load model and data, train, save a reloadable model directory.
Plain functions (the flow's sft and preference steps call them; so can a notebook or a test)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steps.config import LoraConfig, PreferenceConfig, RunConfig, TrainConfig, config_to_dict
from steps.io import read_jsonl, write_json
from steps.model_card import write_model_card
from steps.results import TrainResult
from steps.tracking import Tracker
from steps.train import adapters, checkpoints, collectives, parallel, reference, weights
from steps.train.adapters import apply_lora
from steps.train.attention import preferred_attn_implementation
from steps.train.batching import tokenize_pairs, tokenize_sft
from steps.train.loop import LoopResult, train
from steps.train.objectives import PreferenceObjective, SFTObjective
from steps.train.precision import Precision, resolve_precision
from steps.train.reference import References, ReferenceSource
from steps.train.unpaired import UnpairedObjective, read_reference_cache, unpaired_cache_key

logger = logging.getLogger(__name__)

# Where each loss starts when ``preference.init: auto`` (the documented recipe): ORPO and CPO carry
# their own NLL term and start from the base model; the others start from the SFT checkpoint.
AUTO_INIT_FROM_BASE = {"orpo", "cpo"}


@dataclass(frozen=True)
class StartingPoint:
    """The models a run starts from: the policy's init spec and its label in the results table ("SFT checkpoint",
    "base: <spec>"), the reference (None: reference-free) and the base a LoRA adapter is handed on over."""

    init: str
    init_label: str
    reference: str | None
    adapter_over: str


def pick_device() -> torch.device:
    """This rank's GPU (torchrun's launcher set it from LOCAL_RANK), else the CPU."""
    return parallel.rank_device()


def run_precision(cfg: RunConfig, device: torch.device) -> Precision:
    """``model.dtype`` (compute) and ``model.master_dtype`` (weights, AdamW state) resolved for ``device``."""
    return resolve_precision(cfg.model.dtype, cfg.model.master_dtype, device)


def read_model(
    spec: str, cfg: RunConfig, device: torch.device, precision: Precision, lora: LoraConfig | None
) -> tuple[Any, weights.PendingWeights | None]:
    """``spec`` in the master dtype, and its weights still to come when they are: under a process group (full
    fine-tuning) only global rank 0 reads it and every rank gets the model on the meta device, materialised by
    ``parallel.prepare`` / ``prepare_frozen``; alone, or with LoRA/QLoRA, it is loaded here onto ``device``."""
    from steps.models import load_model

    lora_on = lora is not None and lora.enabled
    if collectives.is_distributed() and not lora_on:
        return weights.read_on_rank0(spec, precision.master, device, attn_implementation=cfg.model.attn_implementation)
    if collectives.is_distributed():
        logger.info("LoRA: every rank loads %s itself (rank-0 loading covers full fine-tuning)", spec)
    model = load_model(
        spec,
        dtype=precision.master,
        device=str(device),
        attn_implementation=cfg.model.attn_implementation or preferred_attn_implementation(device),
        four_bit=adapters.four_bit_of(lora, precision),
    )
    return model, None


def load_for_training(
    spec: str, cfg: RunConfig, device: torch.device, precision: Precision | None = None, lora: LoraConfig | None = None
) -> tuple[Any, weights.PendingWeights | None]:
    """The policy in the master dtype (weights the optimizer updates; compute happens in the compute dtype) and its
    pending weights (:func:`read_model`); ``parallel.prepare`` takes both.

    With ``lora.load_in_4bit`` (QLoRA) the linear layers are loaded in 4 bits and prepared for adapter training."""
    precision = precision or run_precision(cfg, device)
    model, pending = read_model(spec, cfg, device, precision, lora)
    if adapters.four_bit_of(lora, precision) is not None:
        return adapters.prepare_four_bit(model, cfg.model.gradient_checkpointing), pending
    if cfg.model.gradient_checkpointing:
        # non-reentrant: DDP's reducer and FSDP2 both work with it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, pending


def load_reference(spec: str, cfg: RunConfig, device: torch.device, precision: Precision, section: TrainConfig) -> Any:
    """A frozen reference laid out like the policy (``parallel.prepare_frozen``): the master dtype and the same
    compute path (autocast, or FSDP2 sharding with the same mixed-precision policy), so it scores exactly as the
    policy does at the same weights; its base in 4 bits when the policy's is."""
    model, pending = read_model(spec, cfg, device, precision, section.lora)
    return parallel.prepare_frozen(model, section.parallelism, precision, pending)


def _select(rows: list[dict], limit: int | None) -> list[dict]:
    return rows if limit is None else rows[:limit]


def make_tracker(cfg: RunConfig, out_dir: Path) -> Tracker:
    """The tracker of one variant: ``out_dir`` is ``<output root>/<variant>``, so the variant names the tracked
    run, the pipeline run (the output root's name) groups them, and files go to ``<output root>/tracking``."""
    out_dir = Path(out_dir)
    return Tracker(
        cfg.tracking.backends,
        run_name=out_dir.name,
        group=out_dir.parent.name,
        log_dir=out_dir.parent / "tracking",
        project=cfg.tracking.project,
        config=config_to_dict(cfg),
    )


def _finish(
    cfg: RunConfig,
    kind: str,
    start: StartingPoint,
    tokenizer: Any,
    result: LoopResult,
    data_stats: dict,
    out_dir: Path,
) -> TrainResult:
    """Hand the model on (merged, or ``lora.hand_on: adapter``: the adapter over ``start.adapter_over``) and
    summarise; rank 0 also writes ``summary.json`` and the model card."""
    section = cfg.sft if kind == "sft" else cfg.preference
    if section.lora.enabled and section.lora.hand_on == "adapter":
        final_dir = adapters.export_adapter(result.model, tokenizer, out_dir / "final", start.adapter_over)
    else:
        final_dir = checkpoints.export_model(result.model, tokenizer, out_dir / "final")
    summary = TrainResult(
        kind=kind,
        model_dir=str(final_dir),
        init=start.init,
        init_label=start.init_label,
        reference=start.reference,
        config=section,
        steps=result.final_step,
        elapsed_s=result.elapsed_s,
        tokens_per_s=result.tokens_per_s,
        final_train=result.history[-1] if result.history else {},
        final_dev=result.dev_history[-1] if result.dev_history else {},
        data_stats=data_stats,
        metrics_path=str(out_dir / "metrics.jsonl"),
        resumed_from=result.resumed_from,
        precision=str(result.extra.get("precision", "")),
        world_size=int(result.extra.get("world_size", 1)),
        history=result.history,
        dev_history=result.dev_history,
        layout=parallel.last_layout(),
        load_memory=parallel.last_load_memory(),
    )
    if collectives.world()[0] == 0:
        write_json(out_dir / "summary.json", {k: v for k, v in summary.to_dict().items() if k != "history"})
        # every model directory says how it was made; the evaluate step rewrites it with the eval results
        write_model_card(final_dir, summary=summary, run_config=config_to_dict(cfg), eval_result=None)
    logger.info("%s model written to %s (%s)", kind, final_dir, result.extra.get("precision"))
    return summary


def init_label(spec: str, base: str) -> str:
    """How the results table names a starting model other than the SFT checkpoint."""
    return f"base: {spec}" if spec == base else spec


def run_sft(cfg: RunConfig, data_dir: Path, out_dir: Path) -> TrainResult:
    """Supervised fine-tuning on ``data_dir/sft.{train,dev}.jsonl``; the model lands in ``out_dir/final``."""
    from steps.models import load_tokenizer

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    s = cfg.sft
    spec = cfg.model.base if s.init == "base" else s.init
    device = pick_device()
    adapters.check_four_bit("sft", s.lora, device)
    precision = run_precision(cfg, device)
    tokenizer = load_tokenizer(spec)
    train_rows = _select(read_jsonl(data_dir / "sft.train.jsonl"), s.max_examples)
    dev_rows = read_jsonl(data_dir / "sft.dev.jsonl") if (data_dir / "sft.dev.jsonl").exists() else []
    logger.info("SFT: read %d train / %d dev examples from %s", len(train_rows), len(dev_rows), data_dir)
    train_ex, train_stats = tokenize_sft(train_rows, tokenizer, s.max_seq_len, s.overlength)
    dev_ex, dev_stats = tokenize_sft(dev_rows, tokenizer, s.max_seq_len, s.overlength)
    loaded, pending = load_for_training(spec, cfg, device, precision, s.lora)
    adapter_over = adapters.hand_on_base(spec, loaded) if s.lora.enabled else spec
    root = parallel.prepare(apply_lora(loaded, s), s.parallelism, precision, pending)
    objective = SFTObjective(train_ex, dev_ex, tokenizer.pad_token_id, s)
    with make_tracker(cfg, out_dir) as tracker:
        result = train(root, objective, s, out_dir, desc="sft", precision=precision, tracker=tracker)
    stats = {"train": train_stats.as_dict(), "dev": dev_stats.as_dict()}
    start = StartingPoint(spec, f"base: {spec}" if s.init == "base" else spec, None, adapter_over)
    return _finish(cfg, "sft", start, tokenizer, result, stats, out_dir)


def resolve_init_and_reference(
    cfg: RunConfig, loss: str, pcfg: PreferenceConfig, sft_model_dir: str | None
) -> tuple[str, str | None]:
    """Model specs for the policy's starting point and the reference (None: reference-free loss)."""
    from steps import losses

    def spec_of(name: str) -> str:
        if name == "base":
            return cfg.model.base
        if name == "sft":
            if sft_model_dir is None:
                raise ValueError(f"preference.{loss}: init/reference 'sft' needs an SFT model (sft.enabled is false)")
            return str(sft_model_dir)
        return name

    init = pcfg.init
    if init == "auto":
        init = "base" if (loss in AUTO_INIT_FROM_BASE or sft_model_dir is None) else "sft"
    needs_ref = losses.requires_reference(loss)
    ref = pcfg.reference
    if not needs_ref or ref == "none":
        if needs_ref:
            raise ValueError(
                f"preference.reference: {loss} needs a reference model; 'none' is only for "
                "reference-free losses (or provide reference_score_* fields in the data)"
            )
        return spec_of(init), None
    if ref == "auto":
        ref = init
    return spec_of(init), spec_of(ref)


@dataclass
class PreferenceData:
    """A preference run's tokenised examples: pairs (``preference.{train,dev}.jsonl``) for a pairwise loss, or
    unpaired examples (``kto.{train,dev}.jsonl``) for a loss with ``data_kind = "unpaired"``; their length stats."""

    kind: str
    train: list[Any]
    dev: list[Any]
    stats: dict


def read_preference_data(data_dir: Path, loss: str, tokenizer: Any, p: PreferenceConfig) -> PreferenceData:
    """The examples ``loss`` trains on, as its registered data kind says, tokenised as ``p`` says."""
    from steps import losses
    from steps.train.unpaired import read_unpaired

    kind = losses.data_kind(loss)
    if kind == "unpaired":
        train_ex, dev_ex, stats = read_unpaired(data_dir, tokenizer, p)
        if not train_ex:
            raise ValueError(
                f"{data_dir / 'kto.train.jsonl'}: no training example for {loss} (see the 'kto' section of "
                f"{data_dir / 'stats.json'}: how many replies each rule skipped, and why). OpenAssistant export trees "
                "carry no quality labels: set data.oasst_feedback.rule to emoji (users' votes) or pairs (the ranked "
                "pairs split); else check max_seq_len/overlength"
            )
        for split, examples in (("train", train_ex), ("dev", dev_ex)):
            desirable = sum(e.desirable for e in examples)
            stats[split].update(desirable=desirable, undesirable=len(examples) - desirable)
        return PreferenceData(kind, train_ex, dev_ex, stats)
    train_path = data_dir / "preference.train.jsonl"
    if not train_path.exists():
        raise FileNotFoundError(
            f"{train_path} does not exist: {loss} trains on preference pairs, and data.format 'unpaired' has none; "
            "use an unpaired loss (kto) or pair data"
        )
    train_rows = _select(read_jsonl(train_path), p.max_examples)
    dev_path = data_dir / "preference.dev.jsonl"
    dev_rows = read_jsonl(dev_path) if dev_path.exists() else []
    logger.info("%s: read %d train / %d dev pairs from %s", loss, len(train_rows), len(dev_rows), data_dir)
    train_pairs, train_stats = tokenize_pairs(train_rows, tokenizer, p.max_seq_len, p.overlength)
    dev_pairs, dev_stats = tokenize_pairs(dev_rows, tokenizer, p.max_seq_len, p.overlength)
    return PreferenceData(kind, train_pairs, dev_pairs, {"train": train_stats.as_dict(), "dev": dev_stats.as_dict()})


def run_preference(
    cfg: RunConfig, loss: str, data_dir: Path, out_dir: Path, *, sft_model_dir: str | None = None
) -> TrainResult:
    """Preference optimisation with the registered loss ``loss``: a pairwise loss on
    ``data_dir/preference.{train,dev}.jsonl``, an unpaired one (KTO) on ``data_dir/kto.{train,dev}.jsonl``.

    ``cfg.preference`` is the section resolved for ``loss`` (steps.config.for_loss; the flow plans it in start).
    """
    from steps import losses
    from steps.models import load_tokenizer

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    p = cfg.preference
    if p.criterion != loss or p.per_loss:
        raise ValueError(
            f"run_preference({loss!r}) needs the config resolved for {loss!r} (criterion {p.criterion!r}, "
            f"per_loss {sorted(p.per_loss)}); pass steps.config.for_loss(cfg, {loss!r})"
        )
    init_spec, ref_spec = resolve_init_and_reference(cfg, loss, p, sft_model_dir)
    device = pick_device()
    adapters.check_four_bit("preference", p.lora, device)
    precision = run_precision(cfg, device)
    tokenizer = load_tokenizer(init_spec)
    data = read_preference_data(data_dir, loss, tokenizer, p)
    logger.info("%s: init=%s reference=%s", loss, init_spec, ref_spec)
    loss_fn = losses.build_loss(loss, p.criterion_config)
    loaded, pending = load_for_training(init_spec, cfg, device, precision, p.lora)
    adapter_over = adapters.hand_on_base(init_spec, loaded) if p.lora.enabled else init_spec
    from_policy = (
        ref_spec is not None
        and p.reference_mode == "live"
        and adapters.reference_is_policy_base(p.lora, init_spec, ref_spec, loaded)
    )
    root = parallel.prepare(apply_lora(loaded, p), p.parallelism, precision, pending)
    del loaded, pending
    refs = _references(cfg, References(ref_spec, from_policy), init_spec, out_dir, device, precision)
    objective = _objective(data, tokenizer.pad_token_id, p, loss_fn, refs, out_dir, precision)
    with make_tracker(cfg, out_dir) as tracker:
        result = train(root, objective, p, out_dir, desc=loss, precision=precision, tracker=tracker)
    label = "SFT checkpoint" if init_spec == sft_model_dir else init_label(init_spec, cfg.model.base)
    start = StartingPoint(init_spec, label, ref_spec, adapter_over)
    return _finish(cfg, loss, start, tokenizer, result, data.stats, out_dir)


def _references(
    cfg: RunConfig, refs: References, init_spec: str, out_dir: Path, device: torch.device, precision: Precision
) -> References:
    """``refs`` (the reference spec, whether it is the policy's own base) completed: the live reference loaded
    (``preference.reference_mode: live``), or where scores before step 1 come from."""
    p, ref_spec = cfg.preference, refs.spec
    if ref_spec is None:
        return refs
    if refs.from_policy:  # the policy with its adapters disabled: no second model in memory
        logger.info("%s: live reference = the policy with its adapters disabled (%s)", p.criterion, ref_spec)
        return refs
    if p.reference_mode == "live":
        return dataclasses.replace(refs, live=load_reference(ref_spec, cfg, device, precision, p))
    return dataclasses.replace(refs, source=_reference_source(cfg, p, ref_spec, init_spec, out_dir, device, precision))


def _objective(
    data: PreferenceData,
    pad_id: int,
    p: PreferenceConfig,
    loss_fn: Any,
    refs: References,
    out_dir: Path,
    precision: Precision,
) -> PreferenceObjective | UnpairedObjective:
    """The objective of the data's kind, with what a cache in ``out_dir`` already holds of the reference scores
    (scores given in the data win over a cache)."""
    if data.kind == "unpaired":
        if refs.source is not None and refs.spec is not None:
            key = unpaired_cache_key(refs.spec, precision)
            read_reference_cache(out_dir / reference.CACHE_FILE, key, data.train + data.dev)
        return UnpairedObjective(
            data.train,
            data.dev,
            pad_id,
            p,
            loss_fn,
            refs,
        )
    pairs = data.train + data.dev
    if refs.source is not None and refs.spec is not None and reference.has_pending(pairs):
        reference.read_cache(out_dir / reference.CACHE_FILE, reference.cache_key(refs.spec, precision), pairs)
    return PreferenceObjective(
        data.train,
        data.dev,
        pad_id,
        p,
        loss_fn,
        refs.spec is not None,
        refs,
    )


def _reference_source(
    cfg: RunConfig,
    p: PreferenceConfig,
    ref_spec: str,
    init_spec: str,
    out_dir: Path,
    device: torch.device,
    precision: Precision,
) -> ReferenceSource:
    """Where missing reference scores come from: the policy itself before its first update when the reference is
    its init model (the trainer scores before it restores a checkpoint, so a resumed run still scores the initial
    weights), else the reference model, loaded when it is needed and laid out like the policy."""
    cache = out_dir / reference.CACHE_FILE
    if ref_spec == init_spec:
        return ReferenceSource(ref_spec, cache)
    return ReferenceSource(ref_spec, cache, functools.partial(load_reference, ref_spec, cfg, device, precision, p))
