"""TRL's side: DPOTrainer (+ peft_config for LoRA), CPOTrainer (CPO, SimPO), ORPOTrainer, SFTTrainer.

TRL's own fast settings, never a handicap: no gradient checkpointing, its default AdamW, precomputed DPO reference.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import TYPE_CHECKING, Any

from benchmarks import flops, hardware, synthetic
from benchmarks.spec import LORA_TASKS, LOSS_PARAMS, OptimSettings, SideResult, WorkerSpec, lora_settings, loss_name

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig

logger = logging.getLogger(__name__)

# Choices the benchmark measured (--baseline-option): the sampler ("random" or "group_by_length"), whether DPO's
# reference log-probs are precomputed (the precompute is timed and charged like PrefFlow's), padding-free SFT.

DEFAULT_OPTIONS: dict[str, Any] = {"sampling": "random", "precompute_ref": True, "padding_free": False}


def batch_lengths(batch: dict) -> list[int]:
    """Real tokens of each sequence of a collated batch, whatever the collator's layout."""
    if "chosen_attention_mask" in batch and "rejected_attention_mask" in batch:  # CPO / ORPO
        return [
            int(n)
            for key in ("chosen_attention_mask", "rejected_attention_mask")
            for n in batch[key].sum(dim=1).tolist()
        ]
    if batch.get("attention_mask") is not None:  # DPO (chosen rows, then rejected rows), SFT
        return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()  # padding-free: one packed row
    return [b - a for a, b in zip(starts, starts[1:] + [batch["position_ids"].shape[1]])]


class CountingCollator:
    """Wraps a data collator and records each batch's sequence lengths, in the order the trainer consumes them."""

    def __init__(self, inner):
        self.inner = inner
        self.lengths: list[list[int]] = []
        self.seconds = 0.0

    def __call__(self, examples):
        t0 = time.perf_counter()
        batch = self.inner(examples)
        self.seconds += time.perf_counter() - t0
        self.lengths.append(batch_lengths(batch))
        return batch


def _step_timer(device):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step: forward, backward, clip, optimizer and scheduler."""

        def __init__(self):
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            hardware.synchronize(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            hardware.synchronize(device)
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def _trainer_and_config(task: str) -> tuple[Any, Any, str]:
    """TRL's trainer class, its config class and the name the results record, for a benchmark task."""
    task = loss_name(task)
    if task == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig, "trl.DPOTrainer"
    if task in ("simpo", "cpo"):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer, CPOConfig, "trl.experimental.cpo.CPOTrainer"
    if task == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, "trl.experimental.orpo.ORPOTrainer"
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer, SFTConfig, "trl.SFTTrainer"
    raise ValueError(f"no TRL baseline for task {task!r}")


def _loss_args(task: str) -> dict[str, Any]:
    task = loss_name(task)
    p = LOSS_PARAMS.get(task, {})
    if task == "dpo":
        return {"beta": p["beta"], "loss_type": ["sigmoid"]}
    if task == "simpo":
        return {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": p["beta"], "simpo_gamma": p["gamma"]}
    if task == "cpo":
        return {"loss_type": "sigmoid", "beta": p["beta"], "cpo_alpha": p["nll_scale"]}
    if task == "orpo":
        return {"beta": p["orpo_lambda"]}
    return {}


def _peft_config(task: str) -> PeftLoraConfig | None:
    """PrefFlow's LoRA settings as a peft.LoraConfig (None: full fine-tuning)."""
    if task not in LORA_TASKS:
        return None
    import peft

    lora = lora_settings("peft_config")  # exactly what the results record
    return peft.LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )


def run_training(spec: WorkerSpec) -> SideResult:
    """Train ``spec.steps + spec.warmup_steps`` steps with the TRL trainer for the task; report the measured ones."""
    import torch
    from datasets import Dataset

    from steps.losses import requires_reference

    options = {**DEFAULT_OPTIONS, **spec.options}
    opt = OptimSettings()
    device, tokenizer, model, load_s, total_steps, n_examples = hardware.load_side(spec)
    base_shape = flops.model_shape(model)  # before peft wraps it: the reference TRL gets by disabling adapters

    if spec.task == "sft":
        rows = synthetic.conversational(synthetic.sft_rows(tokenizer, n_examples, spec.max_len, spec.data_seed), "sft")
    else:
        rows = synthetic.conversational(
            synthetic.preference_rows(tokenizer, n_examples, spec.max_len, spec.data_seed), "preference"
        )
    if options["sampling"] == "group_by_length":
        from steps.chat import encode_prompt_response

        for row in rows:  # the sampler only needs an order, so PrefFlow's token counts serve as lengths
            responses = [row[k][0]["content"] for k in ("chosen", "rejected", "completion") if k in row]
            p, _ = encode_prompt_response(tokenizer, row["prompt"], "x")
            row["length"] = len(p) + max(len(encode_prompt_response(tokenizer, row["prompt"], r)[1]) for r in responses)
    dataset = Dataset.from_list(rows)

    trainer_cls: Any  # chosen at run time, so the subclass below has a dynamic base
    trainer_cls, config_cls, name = _trainer_and_config(spec.task)
    precompute_s: list[float] = []

    class TimedTrainer(trainer_cls):
        def _precompute_ref_logps(self, *args, **kwargs):
            hardware.synchronize(device)
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            hardware.synchronize(device)
            precompute_s.append(time.perf_counter() - t)
            return out

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out_dir:
        args: dict[str, Any] = dict(
            output_dir=out_dir,
            per_device_train_batch_size=spec.batch_size,
            gradient_accumulation_steps=1,
            max_steps=total_steps,
            learning_rate=opt.sft_lr if spec.task == "sft" else opt.lr,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.betas[0],
            adam_beta2=opt.betas[1],
            max_grad_norm=opt.max_grad_norm,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=opt.seed,
            data_seed=opt.seed,
            dataloader_num_workers=0,
            gradient_checkpointing=False,
            bf16=device.type == "cuda",
            max_length=spec.max_len,
            train_sampling_strategy=options["sampling"],
            **_loss_args(spec.task),
        )
        if loss_name(spec.task) == "dpo":
            args["precompute_ref_log_probs"] = bool(options["precompute_ref"])
        if spec.task in ("simpo", "cpo", "orpo") or options["sampling"] == "group_by_length":
            # CPO/ORPO's collator needs the raw columns; the length-grouped sampler needs "length"
            args["remove_unused_columns"] = False
        if spec.task == "sft":
            args["padding_free"] = bool(options["padding_free"])
            if options["padding_free"]:
                args["max_length"] = None  # TRL refuses padding_free + max_length without packing; data fits
        config = config_cls(**args)
        timer = _step_timer(device)
        t0 = time.perf_counter()
        torch.manual_seed(opt.seed)
        trainer = TimedTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
            peft_config=_peft_config(spec.task),
        )
        setup_s = time.perf_counter() - t0 - sum(precompute_s)
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        policy = trainer.model

    if len(timer.times) != total_steps or len(counter.lengths) < total_steps:
        raise RuntimeError(
            f"expected {total_steps} steps, TRL ran {len(timer.times)} ({len(counter.lengths)} batches collated)"
        )
    tokens = [sum(x) for x in counter.lengths[:total_steps]]
    needs_reference = spec.task != "sft" and requires_reference(loss_name(spec.task))
    counted = flops.step_flops(
        flops.model_shape(policy),
        base_shape if needs_reference else None,
        counter.lengths[spec.warmup_steps : total_steps],
    )
    settings = {
        **options,
        "optim": config.optim,
        "gradient_checkpointing": config.gradient_checkpointing,
        "collate_s": round(counter.seconds, 3),
        "trl_version": __import__("trl").__version__,
        "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
    }
    if spec.task in LORA_TASKS:
        settings["lora"] = lora_settings("peft_config")
    return SideResult(
        side="baseline",
        task=spec.task,
        model=spec.model,
        implementation=name,
        device=hardware.device_name(device),
        threads=torch.get_num_threads(),
        params=sum(p.numel() for p in policy.parameters()),
        settings=settings,
        step_times_s=timer.times[spec.warmup_steps :],
        step_tokens=tokens[spec.warmup_steps :],
        warmup_tokens=sum(tokens[: spec.warmup_steps]),
        precompute_s=sum(precompute_s) if precompute_s else None,
        load_s=load_s,
        setup_s=setup_s,
        first_loss=losses[0] if losses else None,
        peak_rss_mb=hardware.vm_hwm_mb(),
        cuda_peak_mb=hardware.cuda_peak_mb(device),
        train_flops=counted["train_flops"],
        reference_flops=counted["reference_flops"],
        flops_detail={k: counted[k] for k in ("policy_shape", "reference_shape")},
        gemm_shapes=flops.gemm_shapes(policy),
    )
