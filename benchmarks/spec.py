"""What one benchmark child runs (``WorkerSpec``) and what it reports back (``SideResult``)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from steps.config import LoraConfig

# a task is a training objective (a loss name, or "sft"), optionally with LoRA, or batched generation
PREFERENCE_TASKS = ("dpo", "simpo", "orpo", "cpo", "dpo_lora")
LORA_TASKS = ("dpo_lora",)
TRAIN_TASKS = PREFERENCE_TASKS + ("sft",)
TASKS = TRAIN_TASKS + ("generate",)

# LoRA as PrefFlow's `preference.lora` defaults give it (r 16, alpha 32, no dropout, q/k/v/o projections);
# the TRL side gets the same values as a peft.LoraConfig.
LORA = LoraConfig(enabled=True)


def lora_settings(via: str) -> dict[str, Any]:
    """The LoRA settings both sides train with, as their results record them (``via``: how the side applied it)."""
    return {
        "r": LORA.r,
        "alpha": LORA.alpha,
        "dropout": LORA.dropout,
        "target_modules": list(LORA.target_modules),
        "via": via,
    }


def loss_name(task: str) -> str:
    """The registered loss a preference task trains with ("dpo_lora" -> "dpo")."""
    return task.removesuffix("_lora")


# ~1B Llama: Llama 3.2 1B's config in the repository (configs/models/llama3.2-1b), randomly initialised, with the
# repository's tokenizer: a GPU-sized model that needs no download and no model cache. "1b-tiny" is the same config
# narrowed to CPU size (the GPU check's dry run).
ONE_B_TINY_OVERRIDES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_hidden_layers": 2,
    "vocab_size": 1536,
}
MODELS = {
    "tiny": "tiny",
    "default": "embedded:smollm2-135m-instruct",
    "1b": "random:llama3.2-1b",
    "1b-tiny": "random:llama3.2-1b:" + json.dumps(ONE_B_TINY_OVERRIDES, separators=(",", ":"), sort_keys=True),
}

# Loss hyperparameters, identical on both sides (PrefFlow names -> TRL names in benchmarks.trl_side).
LOSS_PARAMS: dict[str, dict[str, float]] = {
    "dpo": {"beta": 0.1},
    "simpo": {"beta": 1.0, "gamma": 0.5},
    "orpo": {"orpo_lambda": 0.1, "nll_scale": 1.0},
    "cpo": {"beta": 0.1, "nll_scale": 1.0},
}


@dataclass
class OptimSettings:
    """The optimisation recipe both sides use (values matter little for speed, but they are the same)."""

    lr: float = 1e-6
    sft_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 1814


@dataclass
class WorkerSpec:
    side: str  # "prefflow" or "baseline"
    task: str
    model: str  # key of MODELS
    steps: int  # measured optimizer steps (or generation prompts for "generate")
    warmup_steps: int
    batch_size: int
    max_len: int
    threads: int
    out: str
    data_seed: int = 0
    gen_prompts: int = 16
    gen_batch_size: int = 16
    gen_max_new_tokens: int = 64
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


@dataclass
class SideResult:
    """One side's measurements. Times in seconds, memory in MiB, throughput in tokens per second."""

    side: str
    task: str
    model: str
    implementation: str  # e.g. "prefflow", "trl.DPOTrainer"
    device: str
    threads: int
    params: int
    settings: dict[str, Any]
    step_times_s: list[float] = field(default_factory=list)  # measured steps only (warmup excluded)
    step_tokens: list[int] = field(default_factory=list)
    warmup_tokens: int = 0
    precompute_s: float | None = None  # reference log-probs over the whole training set
    load_s: float = 0.0
    setup_s: float = 0.0  # data preparation / trainer construction (precompute excluded)
    first_loss: float | None = None
    peak_rss_mb: float | None = None  # VmHWM reported by the child itself
    cuda_peak_mb: float | None = None
    # generation
    prompts: int = 0
    generated_tokens: int = 0
    generate_s: float | None = None
    outputs: list[str] = field(default_factory=list)
    # model FLOPs of the measured steps (benchmarks.flops): training, plus the reference forward when there is one
    train_flops: int | None = None
    reference_flops: int | None = None
    flops_detail: dict[str, Any] = field(default_factory=dict)
    gemm_shapes: list[list[int]] = field(default_factory=list)  # the policy's [in, out, count] for the probe

    @property
    def step_time_median_s(self) -> float | None:
        return statistics.median(self.step_times_s) if self.step_times_s else None

    @property
    def train_tokens_per_s(self) -> float | None:
        if not self.step_times_s:
            return None
        return sum(self.step_tokens) / sum(self.step_times_s)

    @property
    def tokens_per_s(self) -> float | None:
        """Headline throughput. Training: tokens per second of training steps, with the reference
        precompute (when there is one) charged per token over every token it covered. Generation:
        generated tokens per second."""
        if self.task == "generate":
            return self.generated_tokens / self.generate_s if self.generate_s else None
        train = self.train_tokens_per_s
        if train is None:
            return None
        if self.precompute_s:
            covered = sum(self.step_tokens) + self.warmup_tokens
            return 1.0 / (1.0 / train + self.precompute_s / covered)
        return train

    @property
    def flops_per_s(self) -> float | None:
        """Achieved model FLOP/s, the reference precompute charged like in :attr:`tokens_per_s`."""
        tokens, rate = sum(self.step_tokens), self.tokens_per_s
        if self.train_flops is None or not tokens or not rate:
            return None
        return (self.train_flops + (self.reference_flops or 0)) * rate / tokens

    @property
    def prompts_per_s(self) -> float | None:
        return self.prompts / self.generate_s if self.generate_s else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            step_time_median_s=self.step_time_median_s,
            train_tokens_per_s=self.train_tokens_per_s,
            tokens_per_s=self.tokens_per_s,
            prompts_per_s=self.prompts_per_s,
            flops_per_s=self.flops_per_s,
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SideResult:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})
