"""Pairwise judges in alpaca_eval's format, made by name in ``make_judge``: ``local_logprob`` (here: a local causal LM
shown the official AlpacaEval 2 prompt, scored from its "m"/"M" next-token probabilities), ``openai_compatible`` and
``alpaca_eval:<config>``; preference in [1, 2], 1 = output_1 (reference) wins, 2 = output_2 (model) wins."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from steps.chat import render_prompt
from steps.evaluate.alpaca_eval_judge import AlpacaEvalJudge
from steps.evaluate.annotator_prompt import (
    ALPACA_EVAL_SWITCH_SEED,
    OFFICIAL_ANNOTATOR,
    AnnotatorPromptJudge,
    JudgeError,
)
from steps.evaluate.generation import resolve_device
from steps.evaluate.judge_base import Judge
from steps.evaluate.prefix_scoring import PrefixCachedScorer
from steps.evaluate.served_judge import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S, ServedJudge
from steps.models import DEFAULT_MODEL, load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_JUDGE",
    "DEFAULT_JUDGE_MAX_CHARS",
    "AlpacaEvalJudge",
    "Judge",
    "JudgeError",
    "LocalLogprobJudge",
    "ServedJudge",
    "make_judge",
]

DEFAULT_JUDGE = "local_logprob"
#: Each output is cut to this many characters before the local judge sees it (the prompt must fit a small model).
DEFAULT_JUDGE_MAX_CHARS = 1500
#: Models too small to judge anything: their numbers test the mechanism only.
WEAK_JUDGE_SPECS = ("embedded:smollm2-135m-instruct", "tiny")


class LocalLogprobJudge(AnnotatorPromptJudge):
    """A local causal LM scoring "m" vs "M" after alpaca_eval's official annotator prompt.

    The prompt is alpaca_eval's template filled by its ``make_prompts``, split into system/user messages as
    alpaca_eval sends it to chat models, and rendered with the judge tokenizer's chat template; the outputs are
    swapped by alpaca_eval's seeded coin and each is cut at ``judge_max_chars`` characters. The identifiers are
    the tokens the judge would emit first after the assistant header (checked to be single tokens). The template's
    fixed start is run once and its KV cache reused for every judgement.
    """

    name = "local_logprob"

    def __init__(
        self,
        model_spec: str | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        annotator_config: str = OFFICIAL_ANNOTATOR,
        judge_max_chars: int = DEFAULT_JUDGE_MAX_CHARS,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
        switch_seed: int = ALPACA_EVAL_SWITCH_SEED,
        show_progress: bool = True,
    ):
        if isinstance(judge_max_chars, bool) or not isinstance(judge_max_chars, int) or judge_max_chars < 1:
            raise JudgeError(f"judge_max_chars must be an integer >= 1, got {judge_max_chars!r}")
        super().__init__(model_spec or DEFAULT_MODEL, annotator_config, switch_seed)
        self.judge_max_chars = judge_max_chars
        self.device, self.dtype = resolve_device(device), dtype
        self.seed = seed
        self.show_progress = show_progress
        self._model, self._tokenizer = model, tokenizer
        self._identifier_ids: dict[str, int] | None = None
        self._prefix_ids: list[int] | None = None
        self._scorer: PrefixCachedScorer | None = None
        self.judgements = 0
        self.seconds_judging = 0.0

    @property
    def cache_identity(self) -> str:
        # ``max_output_chars=`` is the knob's former name, kept verbatim so caches written before the rename to
        # ``judge_max_chars`` stay valid: the same string means the same judgement
        seed = f"|seed={self.seed}" if self.judge_model.startswith("tiny") else ""
        return (
            f"{self.label}|template={self.annotator_config}|max_output_chars={self.judge_max_chars}"
            f"|switch_seed={self.switch_seed}{seed}"
        )

    @property
    def weak_judge(self) -> bool:
        return self.judge_model in WEAK_JUDGE_SPECS or self.judge_model.startswith("tiny")

    @property
    def forward_passes(self) -> int:
        """Model calls made so far (0 when every judgement came from the cache)."""
        return self._scorer.forward_passes if self._scorer is not None else 0

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "judge_max_chars": self.judge_max_chars,
            "note": ("weak judge: checks the mechanism, not a quality signal" if self.weak_judge else ""),
        }

    # -- setup --------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.judge_model)
        return self._tokenizer

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model = load_model(self.judge_model, dtype=self.dtype, device=self.device, seed=self.seed)
        return self._model

    def check(self) -> None:
        """Template readable, identifiers single tokens for this tokenizer (loads the tokenizer, not the model)."""
        self.identifier_ids()

    def render(self, instruction: str, output_1: str, output_2: str) -> str:
        """The full judge prompt text for a pair as presented (after any swap and cut)."""
        return render_prompt(self.tokenizer, self.messages(instruction, output_1, output_2))

    def identifier_ids(self) -> dict[str, int]:
        """Token id of each output identifier as the first token of the judge's answer."""
        if self._identifier_ids is None:
            tokens = dict.fromkeys([self.template.numerator_token, *self.template.denominator_tokens])
            prompt = self.render("instruction", "output one", "output two")
            base = self._encode(prompt)
            ids: dict[str, int] = {}
            for token in tokens:
                with_answer = self._encode(prompt + token)
                if len(with_answer) != len(base) + 1 or with_answer[: len(base)] != base:
                    raise JudgeError(
                        f"judge tokenizer of {self.judge_model!r} does not answer {token!r} with a single token after "
                        f"the prompt; the local log-prob judge needs single-token identifiers"
                    )
                ids[token] = with_answer[-1]
            if len(set(ids.values())) != len(ids):
                raise JudgeError(
                    f"judge tokenizer of {self.judge_model!r} maps identifiers {list(ids)} to the same token ids {ids}"
                )
            self._identifier_ids = ids
        return self._identifier_ids

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def shared_prefix_ids(self) -> list[int]:
        """Token ids every judge prompt starts with (the template up to the instruction text).

        Two tokens short of the rendered text before the instruction, so that a token merging across the
        boundary cannot break the match; each prompt is still checked before the cache is used.
        """
        if self._prefix_ids is None:
            sentinel = "\u2063PREFFLOW_INSTRUCTION\u2063"
            rendered = self.render(sentinel, "a", "b")
            self._prefix_ids = self._encode(rendered[: rendered.index(sentinel)])[:-2]
        return self._prefix_ids

    # -- scoring ------------------------------------------------------------------------------------------------

    def identifier_logprobs(self, prompt_ids: list[int]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Log-probabilities of each identifier as the next token, and the top-5 next tokens."""
        import torch

        if self._scorer is None:
            self._scorer = PrefixCachedScorer(self.model, self.shared_prefix_ids())
        logprobs = self._scorer.next_token_logprobs(prompt_ids)
        top = torch.topk(logprobs, k=5)
        identifier = {token: float(logprobs[token_id]) for token, token_id in self.identifier_ids().items()}
        top5 = [
            {"token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
            for v, i in zip(top.values.tolist(), top.indices.tolist())
        ]
        return identifier, top5

    def judge_one(self, instruction: str, output_1: str, output_2: str, switched: bool) -> dict[str, Any]:
        """One judgement in alpaca_eval's annotation fields; ``switched`` shows output_2 first."""
        started = time.monotonic()
        first, second = (output_2, output_1) if switched else (output_1, output_2)
        cut_first, cut_second = first[: self.judge_max_chars], second[: self.judge_max_chars]
        prompt_ids = self._encode(self.render(instruction, cut_first, cut_second))
        identifier, top5 = self.identifier_logprobs(prompt_ids)
        preference = self.preference(identifier, switched)
        elapsed = time.monotonic() - started
        self.judgements += 1
        self.seconds_judging += elapsed
        return {
            "preference": preference,
            "raw_completion": {
                "identifier_logprobs": identifier,
                "top_logprobs": top5,
                "is_switched_outputs": switched,
                "prompt_tokens": len(prompt_ids),
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 0},  # reads one distribution
                "outputs_cut_at_chars": self.judge_max_chars
                if max(len(first), len(second)) > self.judge_max_chars
                else None,
            },
            "time_per_example": elapsed,
            "price_per_example": 0.0,
        }

    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        switched = self.switches(pairs)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for index in tqdm(
                range(len(pairs)), desc=f"judge {self.judge_model}", unit="judgement", disable=not self.show_progress
            ):
                pair = pairs[index]
                on_result(
                    index, self.judge_one(pair["instruction"], pair["output_1"], pair["output_2"], switched[index])
                )
        finally:
            model.train(was_training)


def make_judge(
    name: str = DEFAULT_JUDGE,
    *,
    judge_model: str | None = None,
    judge_max_chars: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    show_progress: bool = True,
    judge_base_url: str | None = None,
    judge_api_key_env: str | None = None,
    judge_max_requests: int | None = None,
    judge_timeout_s: float | None = None,
    judge_concurrency: int | None = None,
    **alpaca_eval_kwargs: Any,
) -> Judge:
    """``local_logprob[:<model spec>]``, ``openai_compatible[:<served model>]`` or ``alpaca_eval:<config>``.

    The local judge runs ``judge_model`` (a spec; a spec in the name wins; default the embedded model), or the
    loaded ``model`` and ``tokenizer``, on outputs cut at ``judge_max_chars`` (default 1500). The served judge
    sends the official weighted prompt to ``judge_base_url`` for the model named ``judge_model`` (or in the name),
    with the key from the environment variable ``judge_api_key_env``. Options of one kind are ignored by the
    others; ``alpaca_eval_kwargs`` go to alpaca_eval's annotator.
    """
    if name == "local_logprob" or name.startswith("local_logprob:"):
        if alpaca_eval_kwargs:
            raise JudgeError(
                f"options {sorted(alpaca_eval_kwargs)} are for 'alpaca_eval:' judges; the local judge "
                f"takes judge_model, judge_max_chars, device, dtype, model and tokenizer"
            )
        spec = name.split(":", 1)[1] if ":" in name else judge_model
        max_chars = DEFAULT_JUDGE_MAX_CHARS if judge_max_chars is None else judge_max_chars
        return LocalLogprobJudge(
            spec,
            model=model,
            tokenizer=tokenizer,
            judge_max_chars=max_chars,
            device=device,
            dtype=dtype,
            show_progress=show_progress,
        )
    if name == "openai_compatible" or name.startswith("openai_compatible:"):
        served = name.split(":", 1)[1] if ":" in name else judge_model
        if not served or served == DEFAULT_MODEL or served.startswith(("embedded:", "tiny")):
            raise JudgeError(
                f"judge 'openai_compatible' needs the name the server serves its model under "
                f"(evaluation.judge_model, e.g. meta-llama/Llama-3.1-70B-Instruct), got {served!r}"
            )
        return ServedJudge(
            served,
            judge_base_url,
            api_key_env=judge_api_key_env,
            max_requests=judge_max_requests,
            timeout_s=DEFAULT_TIMEOUT_S if judge_timeout_s is None else judge_timeout_s,
            concurrency=DEFAULT_CONCURRENCY if judge_concurrency is None else judge_concurrency,
            show_progress=show_progress,
            **alpaca_eval_kwargs,
        )
    if name.startswith("alpaca_eval:"):
        config = name.split(":", 1)[1]
        if not config:
            raise JudgeError(f"judge 'alpaca_eval:' needs an annotator config, e.g. 'alpaca_eval:{OFFICIAL_ANNOTATOR}'")
        return AlpacaEvalJudge(config, **alpaca_eval_kwargs)
    raise JudgeError(
        f"unknown judge {name!r}; use 'local_logprob' (offline), 'local_logprob:<model spec>', "
        f"'openai_compatible' (a served model, e.g. vLLM) or 'alpaca_eval:<annotator config>' "
        f"(e.g. 'alpaca_eval:{OFFICIAL_ANNOTATOR}')"
    )
