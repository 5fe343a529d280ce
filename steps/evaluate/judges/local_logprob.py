"""``local_logprob[:<model spec>]``: a local causal LM shown alpaca_eval's official AlpacaEval 2 annotator prompt,
scored from its "m"/"M" next-token probabilities. Owns the local judge's defaults."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from steps.chat import render_prompt
from steps.evaluate.generation import resolve_device
from steps.evaluate.judges.annotator_prompt import AnnotatorPromptJudge, AnnotatorProtocol
from steps.evaluate.judges.base import ENDPOINT_LOCAL, Judge, JudgeError, JudgeSettings
from steps.evaluate.judges.prefix_scoring import PrefixCachedScorer
from steps.evaluate.judges.registry import register_judge
from steps.models import DEFAULT_MODEL, load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Each output is cut to this many characters before the local judge sees it (the prompt must fit a small model).
DEFAULT_JUDGE_MAX_CHARS = 1500
#: Models too small to judge anything: their numbers test the mechanism only.
WEAK_JUDGE_SPECS = ("embedded:smollm2-135m-instruct", "tiny")


@register_judge("local_logprob")
class LocalLogprobJudge(AnnotatorPromptJudge):
    """A local causal LM scoring "m" vs "M" after alpaca_eval's official annotator prompt.

    The prompt is alpaca_eval's template filled by its ``make_prompts``, split into system/user messages as
    alpaca_eval sends it to chat models, and rendered with the judge tokenizer's chat template; the outputs are
    swapped by alpaca_eval's seeded coin and each is cut at ``judge_max_chars`` characters. The identifiers are
    the tokens the judge would emit first after the assistant header (checked to be single tokens). The template's
    fixed start is run once and its KV cache reused for every judgement.
    """

    argument = "model spec"
    usage = ("'local_logprob' (offline)", "'local_logprob:<model spec>'")
    endpoint = ENDPOINT_LOCAL
    #: The init seed of a randomly initialised judge model (``tiny``); part of such a judge's cache identity.
    seed = 0

    def __init__(
        self,
        model_spec: str | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        judge_max_chars: int = DEFAULT_JUDGE_MAX_CHARS,
        device: str = "auto",
        dtype: str = "float32",
        protocol: AnnotatorProtocol | None = None,
        show_progress: bool = True,
    ):
        if isinstance(judge_max_chars, bool) or not isinstance(judge_max_chars, int) or judge_max_chars < 1:
            raise JudgeError(f"judge_max_chars must be an integer >= 1, got {judge_max_chars!r}")
        super().__init__(model_spec or DEFAULT_MODEL, protocol or AnnotatorProtocol())
        self.judge_max_chars = judge_max_chars
        self.device, self.dtype = resolve_device(device), dtype
        self.show_progress = show_progress
        self._model, self._tokenizer = model, tokenizer
        self._identifier_ids: dict[str, int] | None = None
        self._prefix_ids: list[int] | None = None
        self._scorer: PrefixCachedScorer | None = None
        self.judgements = 0
        self.seconds_judging = 0.0

    @classmethod
    def from_options(cls, argument: str | None, options: JudgeSettings) -> Judge:
        """The model spec after ``local_logprob:`` wins over ``judge_model``; outputs cut at ``judge_max_chars``."""
        if options.extra:
            raise JudgeError(
                f"options {sorted(options.extra)} are for 'alpaca_eval:' judges; the local judge "
                f"takes judge_model, judge_max_chars, device, dtype, model and tokenizer"
            )
        return cls(
            argument if argument is not None else options.judge_model,
            model=options.model,
            tokenizer=options.tokenizer,
            judge_max_chars=DEFAULT_JUDGE_MAX_CHARS if options.judge_max_chars is None else options.judge_max_chars,
            device=options.device,
            dtype=options.dtype,
            show_progress=options.show_progress,
        )

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
