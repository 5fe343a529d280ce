"""Pointwise scoring with a reward model: an ``AutoModelForSequenceClassification`` with one output, reading each
(prompt, answer) rendered with its tokenizer's chat template as training renders a conversation. One forward pass
per answer (batched) instead of a judgement per pair: the fast judge for on-policy rounds."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from steps.onpolicy.prompts import OnPolicyError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardScores:
    """One reward per (instruction, answer), the tokens each input had, and the seconds spent."""

    rewards: list[float]
    tokens: list[int]
    seconds: float


class RewardModelScorer:
    """Loads the reward model named by ``spec`` (a save_pretrained directory or Hub id) on first use.

    Inputs are right-padded with the model's ``pad_token_id``: transformers pools the logit of the last token that
    is not the pad id, and behind a causal mask the padding changes no earlier position, so a batch scores each
    answer as a forward pass over it alone does. A model without a pad id is run one answer at a time.
    """

    def __init__(self, spec: str, *, device: str = "auto", dtype: str = "float32", batch_size: int = 16):
        if not isinstance(spec, str) or not spec.strip():
            raise OnPolicyError("reward_model: needs a model spec, e.g. reward_model:/models/my-reward-model")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OnPolicyError(f"reward model batch_size must be an integer >= 1, got {batch_size!r}")
        from steps.evaluate.generation import resolve_device

        self.spec, self.device, self.dtype, self.batch_size = spec.strip(), resolve_device(device), dtype, batch_size
        self._model: Any = None
        self._tokenizer: Any = None

    @property
    def label(self) -> str:
        return f"reward_model:{self.spec}"

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from steps.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.spec)
        return self._tokenizer

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        from steps.models.load import resolve_dtype, torch_dtype
        from steps.models.specs import hub_errors, resolve_model_spec

        source = resolve_model_spec(self.spec)
        if source.kind not in ("local", "hub"):
            raise OnPolicyError(
                f"reward_model:{self.spec}: a reward model must be a save_pretrained directory or a Hub id of an "
                f"AutoModelForSequenceClassification, not a {source.kind} model spec"
            )
        started = time.monotonic()
        with hub_errors(self.spec, source.kind == "hub"):
            model = AutoModelForSequenceClassification.from_pretrained(
                source.location, dtype=torch_dtype(resolve_dtype(self.dtype, self.device))
            )
        if model.config.num_labels != 1:
            raise OnPolicyError(
                f"reward_model:{self.spec} has {model.config.num_labels} outputs (num_labels); a reward model "
                "gives one score per answer (num_labels: 1)"
            )
        model.to(self.device).eval()
        logger.info("loaded reward model %s on %s in %.1f s", self.spec, self.device, time.monotonic() - started)
        return model

    def encode(self, instruction: str, answer: str) -> list[int]:
        """The reward model's input ids: the user turn and the answer with its end-of-turn token, as training
        encodes a conversation (steps.chat.encode_prompt_response) with the reward model's tokenizer."""
        from steps.chat import encode_prompt_response

        prompt_ids, answer_ids = encode_prompt_response(
            self.tokenizer, [{"role": "user", "content": instruction}], answer
        )
        return prompt_ids + answer_ids

    def score(self, pairs: Sequence[tuple[str, str]], show_progress: bool = True) -> RewardScores:
        """A reward per ``(instruction, answer)``, in input order."""
        import torch

        started = time.monotonic()
        inputs = [self.encode(instruction, answer) for instruction, answer in pairs]
        pad_id = self.model.config.pad_token_id
        size = self.batch_size if pad_id is not None else 1
        order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), i))
        rewards: list[float] = [0.0] * len(inputs)
        progress = tqdm(total=len(inputs), desc=f"reward {self.spec}", unit="answer", disable=not show_progress)
        with torch.inference_mode():
            for start in range(0, len(order), size):
                members = order[start : start + size]
                width = max(len(inputs[i]) for i in members)
                ids = torch.full((len(members), width), pad_id if pad_id is not None else 0, dtype=torch.long)
                mask = torch.zeros((len(members), width), dtype=torch.long)
                for row, i in enumerate(members):
                    ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
                    mask[row, : len(inputs[i])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for row, i in enumerate(members):
                    rewards[i] = float(logits[row, 0].float())
                progress.update(len(members))
        progress.close()
        return RewardScores(rewards, [len(ids) for ids in inputs], time.monotonic() - started)

    def close(self) -> None:
        """Free the model (its memory is needed by training next)."""
        self._model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
