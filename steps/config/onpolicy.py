"""The ``preference.on_policy`` section: rounds of sampling from the policy being trained, judging its answers and
training on the pairs that judging ranks apart. Imports nothing heavy: run configs are parsed in every step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from steps.config.convert import require as _require

#: Prompt sources that would train on what is measured: refused by name.
FORBIDDEN_PROMPT_SOURCES = ("eval", "dev", "test", "alpaca_eval")
#: Judges whose scores come from a pointwise reward model (``reward_model:<model spec>``).
REWARD_MODEL_PREFIX = "reward_model:"
PAIRINGS = ("best_vs_worst", "best_vs_rest", "all_pairs")


@dataclass(frozen=True)
class OnPolicyConfig:
    """Rounds of on-policy preference data (with ``enabled``): each round samples ``samples_per_prompt`` answers per
    prompt from the current policy, scores them with ``judge``, pairs them as ``pairing`` says and trains from the
    current policy.

    ``prompts``: ``train`` (the unique single-turn prompts of the prepared ``preference.train.jsonl``) or a path to
    a JSONL file (``instruction``, or ``prompt`` as a string or one user message). With ``max_prompts`` each round
    takes the next window of a seeded permutation of them (rounds see different prompts while they last).
    ``judge``: a judge name as ``evaluation.judge`` takes it (pairwise, alpaca_eval's format; its other options
    come from the evaluation section, ``judge_model`` overridable here) or ``reward_model:<model spec>`` (a
    sequence-classification reward model scoring each answer alone). ``min_margin`` is in the judge's score units:
    the reward difference, or the difference of mean pairwise win probabilities (0..1) for pairwise judges.
    ``reference``: what each round's reference model is, the policy the round starts from or the SFT model.
    """

    enabled: bool = False
    rounds: int = 2
    samples_per_prompt: int = 2
    prompts: str = "train"
    max_prompts: int | None = None
    temperature: float = 0.9
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    seed: int = 1814
    judge: str = "local_logprob"
    judge_model: str | None = None  # null: evaluation.judge_model
    pairing: Literal["best_vs_worst", "best_vs_rest", "all_pairs"] = "best_vs_worst"
    min_margin: float = 0.0
    reference: Literal["round_start", "sft"] = "round_start"

    def check(self) -> None:
        if not self.enabled:
            changed = [f.name for f in fields(self) if getattr(self, f.name) != f.default and f.name != "enabled"]
            _require(
                not changed,
                changed[0] if changed else "enabled",
                f"is set but on_policy.enabled is false; set enabled: true to train in on-policy rounds (or remove "
                f"{', '.join(changed)})",
            )
        _require(self.rounds >= 1, "rounds", f"got {self.rounds!r}; must be >= 1")
        _require(
            self.samples_per_prompt >= 2,
            "samples_per_prompt",
            f"got {self.samples_per_prompt!r}; must be >= 2 (a pair needs two answers to the same prompt)",
        )
        _require(
            self.prompts.strip().lower() not in FORBIDDEN_PROMPT_SOURCES,
            "prompts",
            f"got {self.prompts!r}: on-policy rounds never train on evaluation or dev prompts; use 'train' (the "
            "prepared preference train set) or a JSONL file of training prompts",
        )
        _require(
            self.prompts == "train" or self.prompts.endswith((".jsonl", ".jsonl.gz")),
            "prompts",
            f"got {self.prompts!r}; use 'train' or a path to a .jsonl file with 'instruction' or 'prompt' fields",
        )
        if self.max_prompts is not None:
            _require(self.max_prompts >= 1, "max_prompts", f"got {self.max_prompts!r}; must be >= 1 or null")
        _require(
            self.temperature > 0,
            "temperature",
            f"got {self.temperature!r}; must be > 0 (greedy decoding gives one answer per prompt, nothing to pair)",
        )
        _require(0 < self.top_p <= 1, "top_p", f"got {self.top_p!r}; must be in (0, 1]")
        for name in ("max_new_tokens", "batch_size"):
            _require(getattr(self, name) >= 1, name, f"got {getattr(self, name)!r}; must be >= 1")
        _require(self.min_margin >= 0, "min_margin", f"got {self.min_margin!r}; must be >= 0")
        _require(bool(self.judge.strip()), "judge", "must name a judge, e.g. local_logprob or reward_model:<spec>")
        if self.judge.startswith(REWARD_MODEL_PREFIX):
            _require(
                bool(self.reward_model_spec),
                "judge",
                f"got {self.judge!r}; name the reward model after the colon, e.g. reward_model:/models/my-rm "
                "(a directory or Hub id of an AutoModelForSequenceClassification)",
            )
            _require(
                self.judge_model is None,
                "judge_model",
                "is for pairwise judges; a reward model is named in judge (reward_model:<spec>)",
            )

    @property
    def reward_model_spec(self) -> str | None:
        """The reward model's spec when ``judge`` is ``reward_model:<spec>``, else None (a pairwise judge)."""
        if not self.judge.startswith(REWARD_MODEL_PREFIX):
            return None
        return self.judge[len(REWARD_MODEL_PREFIX) :].strip()

    def judge_options(self, evaluation_options: Mapping[str, Any]) -> dict[str, Any]:
        """``make_judge`` keywords for a pairwise judge: the evaluation section's (``EvaluationConfig.judge_options()``)
        with this section's ``judge_model`` where it is set."""
        options = dict(evaluation_options)
        if self.judge_model is not None:
            options["judge_model"] = self.judge_model
        return options

    def reference_for(self, round_start: str, sft: str) -> str:
        """The reference model spec of a round that starts from ``round_start``."""
        return round_start if self.reference == "round_start" else sft
