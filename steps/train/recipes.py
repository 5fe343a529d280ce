"""SFT and preference training runs: load model and data, train, save a reloadable model directory.
Plain functions (the flow's sft and preference steps call them; so can a notebook or a test)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steps.config import LoraConfig, PreferenceConfig, RunConfig, TrainConfig, config_to_dict
from steps.io import read_jsonl, write_json
from steps.model_card import write_model_card
from steps.tracking import Tracker
from steps.train import adapters, checkpoints, collectives
from steps.train.adapters import apply_lora
from steps.train.attention import preferred_attn_implementation
from steps.train.batching import PairExample, tokenize_pairs, tokenize_sft
from steps.train.loop import Objective, TrainResult, train
from steps.train.objectives import PreferenceObjective, SFTObjective, precompute_reference
from steps.train.precision import Precision, resolve_precision

logger = logging.getLogger(__name__)

# Where each loss starts when ``preference.init: auto`` (the documented recipe): ORPO and CPO carry
# their own NLL term and start from the base model; the others start from the SFT checkpoint.
AUTO_INIT_FROM_BASE = {"orpo", "cpo"}


@dataclass
class RunSummary:
    """What a training step hands to the next step (and to Metaflow as artifacts)."""

    kind: str  # "sft" or the loss name
    model_dir: str
    init: str  # the model spec training started from
    init_label: str  # what the results table shows: "SFT checkpoint" or "base: <spec>"
    reference: str | None
    steps: int
    elapsed_s: float
    tokens_per_s: float
    final_train: dict
    final_dev: dict
    data_stats: dict
    metrics_path: str
    config: dict
    resumed_from: str | None = None
    precision: str = ""  # e.g. "bfloat16 compute, float32 master weights (cuda)"
    world_size: int = 1
    history: list = field(default_factory=list)
    dev_history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def pick_device() -> torch.device:
    """This rank's GPU (torchrun's launcher set it from LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_precision(cfg: RunConfig, device: torch.device) -> Precision:
    """``model.dtype`` (compute) and ``model.master_dtype`` (weights, AdamW state) resolved for ``device``."""
    return resolve_precision(cfg.model.dtype, cfg.model.master_dtype, device)


def load_for_training(
    spec: str, cfg: RunConfig, device: torch.device, precision: Precision | None = None, lora: LoraConfig | None = None
) -> Any:
    """The policy in the master dtype (weights the optimizer updates); compute happens in the compute dtype.

    With ``lora.load_in_4bit`` (QLoRA) the linear layers are loaded in 4 bits and prepared for adapter training."""
    from steps.models import load_model

    precision = precision or run_precision(cfg, device)
    four_bit = adapters.four_bit_of(lora, precision)
    model = load_model(
        spec,
        dtype=precision.master,
        device=str(device),
        attn_implementation=cfg.model.attn_implementation or preferred_attn_implementation(device),
        four_bit=four_bit,
    )
    if four_bit is not None:
        return adapters.prepare_four_bit(model, cfg.model.gradient_checkpointing)
    if cfg.model.gradient_checkpointing:
        # non-reentrant: DDP's reducer and FSDP2 both work with it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_reference(
    spec: str, cfg: RunConfig, device: torch.device, precision: Precision, lora: LoraConfig | None = None
) -> Any:
    """A frozen reference model in the compute dtype (it only runs forwards); in 4 bits when the policy's base is."""
    from steps.models import load_model

    model = load_model(
        spec,
        dtype=precision.compute,
        device=str(device),
        attn_implementation=cfg.model.attn_implementation or preferred_attn_implementation(device),
        four_bit=adapters.four_bit_of(lora, precision),
    )
    return model.eval().requires_grad_(False)


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


def _train_tracked(
    cfg: RunConfig,
    model: Any,
    tokenizer: Any,
    objective: Objective,
    section: TrainConfig,
    out_dir: Path,
    *,
    desc: str,
    precision: Precision,
) -> TrainResult:
    """``train`` with the run's experiment tracker open around it."""
    with make_tracker(cfg, out_dir) as tracker:
        return train(
            model,
            tokenizer,
            objective,
            section,
            out_dir,
            desc=desc,
            precision=precision,
            tracker=tracker,
        )


def _finish(
    kind: str,
    tokenizer: Any,
    result: TrainResult,
    out_dir: Path,
    init: str,
    init_label: str,
    reference: str | None,
    data_stats: dict,
    cfg_section: TrainConfig,
    run_config: RunConfig,
    adapter_over: str,
) -> RunSummary:
    """Hand the model on (merged, or ``lora.hand_on: adapter``: the adapter over ``adapter_over``) and summarise."""
    rank, _ = collectives.world()
    if cfg_section.lora.enabled and cfg_section.lora.hand_on == "adapter":
        final_dir = adapters.export_adapter(result.model, tokenizer, out_dir / "final", adapter_over)
    else:
        final_dir = checkpoints.export_model(result.model, tokenizer, out_dir / "final")
    summary = RunSummary(
        kind=kind,
        model_dir=str(final_dir),
        init=init,
        init_label=init_label,
        reference=reference,
        steps=result.final_step,
        elapsed_s=result.elapsed_s,
        tokens_per_s=result.tokens_per_s,
        final_train=result.history[-1] if result.history else {},
        final_dev=result.dev_history[-1] if result.dev_history else {},
        data_stats=data_stats,
        metrics_path=str(out_dir / "metrics.jsonl"),
        config=config_to_dict(cfg_section),
        resumed_from=result.resumed_from,
        precision=str(result.extra.get("precision", "")),
        world_size=int(result.extra.get("world_size", 1)),
        history=result.history,
        dev_history=result.dev_history,
    )
    if rank == 0:
        write_json(out_dir / "summary.json", {k: v for k, v in summary.as_dict().items() if k not in ("history",)})
        # every model directory says how it was made; the evaluate step rewrites it with the eval results
        write_model_card(final_dir, summary=summary.as_dict(), run_config=config_to_dict(run_config), eval_result=None)
    logger.info("%s model written to %s (%s)", kind, final_dir, result.extra.get("precision"))
    return summary


def run_sft(cfg: RunConfig, data_dir: Path, out_dir: Path) -> RunSummary:
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
    loaded = load_for_training(spec, cfg, device, precision, s.lora)
    adapter_over = adapters.hand_on_base(spec, loaded) if s.lora.enabled else spec
    model = apply_lora(loaded, s)
    objective = SFTObjective(train_ex, dev_ex, tokenizer.pad_token_id, s)
    result = _train_tracked(cfg, model, tokenizer, objective, s, out_dir, desc="sft", precision=precision)
    stats = {"train": train_stats.as_dict(), "dev": dev_stats.as_dict()}
    label = f"base: {spec}" if s.init == "base" else spec
    return _finish("sft", tokenizer, result, out_dir, spec, label, None, stats, s, cfg, adapter_over)


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


def run_preference(
    cfg: RunConfig, loss: str, data_dir: Path, out_dir: Path, *, sft_model_dir: str | None = None
) -> RunSummary:
    """Preference optimisation with the registered loss ``loss`` on ``data_dir/preference.{train,dev}.jsonl``.

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
    train_rows = _select(read_jsonl(data_dir / "preference.train.jsonl"), p.max_examples)
    dev_path = data_dir / "preference.dev.jsonl"
    dev_rows = read_jsonl(dev_path) if dev_path.exists() else []
    logger.info(
        "%s: read %d train / %d dev pairs from %s; init=%s reference=%s",
        loss,
        len(train_rows),
        len(dev_rows),
        data_dir,
        init_spec,
        ref_spec,
    )
    train_pairs, train_stats = tokenize_pairs(train_rows, tokenizer, p.max_seq_len, p.overlength)
    dev_pairs, dev_stats = tokenize_pairs(dev_rows, tokenizer, p.max_seq_len, p.overlength)
    loss_fn = losses.build_loss(loss, p.criterion_config)
    model = load_for_training(init_spec, cfg, device, precision, p.lora)
    adapter_over = adapters.hand_on_base(init_spec, model) if p.lora.enabled else init_spec

    live_reference = None
    reference_from_policy = False
    if ref_spec is not None:
        have_scores = all(x.reference_chosen is not None for x in train_pairs + dev_pairs)
        already_resumable = checkpoints.latest_checkpoint(out_dir / "checkpoints") is not None
        if p.reference_mode == "live" and adapters.reference_is_policy_base(p.lora, init_spec, ref_spec, model):
            reference_from_policy = True  # the policy with its adapters disabled: no second model in memory
            logger.info("%s: live reference = the policy with its adapters disabled (%s)", loss, ref_spec)
        elif p.reference_mode == "live":
            live_reference = load_reference(ref_spec, cfg, device, precision, p.lora)
        elif not have_scores:
            ref_cache = out_dir / "reference_logps.json"
            _load_reference_cache(ref_cache, ref_spec, train_pairs + dev_pairs)
            if any(x.reference_chosen is None for x in train_pairs + dev_pairs):
                if ref_spec == init_spec and not already_resumable:
                    ref_model = model  # the policy before its first update *is* the reference
                else:
                    ref_model = load_reference(ref_spec, cfg, device, precision, p.lora)
                t0 = time.perf_counter()
                precompute_reference(ref_model, train_pairs + dev_pairs, tokenizer.pad_token_id, p, precision=precision)
                logger.info(
                    "reference log-probs for %d pairs in %.1fs (%s, %d ranks)",
                    len(train_pairs) + len(dev_pairs),
                    time.perf_counter() - t0,
                    precision.describe(),
                    collectives.world()[1],
                )
                if collectives.world()[0] == 0:
                    _save_reference_cache(ref_cache, ref_spec, train_pairs + dev_pairs)
                if ref_model is not model:
                    del ref_model
    model = apply_lora(model, p)
    objective = PreferenceObjective(
        train_pairs,
        dev_pairs,
        tokenizer.pad_token_id,
        p,
        loss_fn,
        ref_spec is not None,
        live_reference,
        reference_from_policy=reference_from_policy,
    )
    result = _train_tracked(cfg, model, tokenizer, objective, p, out_dir, desc=loss, precision=precision)
    stats = {"train": train_stats.as_dict(), "dev": dev_stats.as_dict()}
    label = (
        "SFT checkpoint"
        if init_spec == sft_model_dir
        else (f"base: {init_spec}" if init_spec == cfg.model.base else init_spec)
    )
    return _finish(loss, tokenizer, result, out_dir, init_spec, label, ref_spec, stats, p, cfg, adapter_over)


def _load_reference_cache(path: Path, ref_spec: str, pairs: list[PairExample]) -> None:
    from steps.io import read_json

    if not path.exists():
        return
    cached = read_json(path)
    if cached.get("reference") != ref_spec:
        return
    scores = cached["scores"]
    for x in pairs:
        if x.id in scores:
            x.reference_chosen, x.reference_rejected = scores[x.id]


def _save_reference_cache(path: Path, ref_spec: str, pairs: list[PairExample]) -> None:
    write_json(
        path,
        {"reference": ref_spec, "scores": {x.id: [x.reference_chosen, x.reference_rejected] for x in pairs}},
        indent=None,
    )
