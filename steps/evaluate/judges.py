"""Pairwise judges in alpaca_eval's format: which of two outputs to an instruction is better.

Two kinds, made by :func:`make_judge`:

* ``local_logprob``: a local causal LM shown the official AlpacaEval 2 annotator prompt (read from the
  installed alpaca_eval package), with the official seeded position swap, scored like the official
  ``weighted_alpaca_eval_gpt4_turbo`` judge from the next-token probabilities of the two output identifiers
  ("m" = output_1, "M" = output_2). It runs offline; with the embedded 135M model it exercises the mechanism
  and is no quality signal (``weak_judge``).
* ``alpaca_eval:<config>``: alpaca_eval's own PairwiseAnnotator with one of its annotator configs
  (``weighted_alpaca_eval_gpt4_turbo`` is the official AlpacaEval 2 judge; it needs ``OPENAI_API_KEY``).

Preferences follow alpaca_eval: in [1, 2], 1 = output_1 (reference) wins, 2 = output_2 (model) wins, 1.5 a
draw (identical outputs get 1.5 without asking the judge). Judgements are cached on disk per
(judge, instruction, output_1, output_2) so a rerun or a crash never pays for the same judgement twice.
"""
from __future__ import annotations

import abc
import copy
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_JUDGE = "local_logprob"
OFFICIAL_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
DEFAULT_MAX_OUTPUT_CHARS = 1500
#: The seed alpaca_eval's PairwiseAnnotator passes to its output-order switch (its ``seed`` default, 0);
#: checked against the official annotations, where it explains the order of every judged row.
ALPACA_EVAL_SWITCH_SEED = 0
#: Models too small to judge anything: their numbers test the mechanism only.
WEAK_JUDGE_SPECS = ("embedded:smollm2-135m-instruct", "tiny")
#: Environment variables each alpaca_eval completion function needs (any one of them), and its package.
COMPLETION_REQUIREMENTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "openai_completions": (("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"), "openai"),
    "anthropic_completions": (("ANTHROPIC_API_KEY",), "anthropic"),
    "cohere_completions": (("COHERE_API_KEY",), "cohere"),
    "bedrock_anthropic_completions": ((), "boto3"),
    "vllm_local_completions": ((), "vllm"),
    "huggingface_local_completions": ((), "transformers"),
}


class JudgeError(ValueError):
    """A judge that cannot be made or cannot run (unknown name, missing key or package, bad template)."""


class AnnotationInputError(ValueError):
    """Model and reference outputs that cannot be paired (different lengths or instructions)."""


# --------------------------------------------------------------------------------------------------------------
# alpaca_eval's pieces: configs, template, swap, parser
# --------------------------------------------------------------------------------------------------------------


def evaluators_configs_dir() -> Path:
    """``alpaca_eval/evaluators_configs`` of the installed package."""
    from alpaca_eval import constants

    return Path(constants.EVALUATORS_CONFIG_DIR)


def available_annotators() -> list[str]:
    """Names of the annotator configs shipped with the installed alpaca_eval."""
    return sorted(p.parent.name for p in evaluators_configs_dir().glob("*/configs.yaml"))


def resolve_annotator_config(name_or_path: str) -> Path:
    """The ``configs.yaml`` of an alpaca_eval annotator given by name or path; a clear error otherwise."""
    shipped = evaluators_configs_dir() / name_or_path / "configs.yaml"
    if name_or_path and "/" not in name_or_path and shipped.is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "configs.yaml").is_file():
        return path / "configs.yaml"
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return path
    names = available_annotators()
    preferred = [n for n in (OFFICIAL_ANNOTATOR, "alpaca_eval_gpt4_turbo_fn", "weighted_alpaca_eval_gpt-4o-mini-2024-07-18",
                             "alpaca_eval_llama3_70b_fn", "weighted_alpaca_eval_vllm_llama3_70b") if n in names]
    raise JudgeError(
        f"unknown alpaca_eval annotator {name_or_path!r}: not a config in {evaluators_configs_dir()} and not a "
        f"path to a configs.yaml. Available include: {', '.join(preferred or names[:8])} "
        f"({len(names)} in total). The official AlpacaEval 2 judge is {OFFICIAL_ANNOTATOR!r}."
    )


def read_annotator_configs(config_path: Path) -> dict[str, dict[str, Any]]:
    import yaml

    with open(config_path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise JudgeError(f"{config_path}: expected a mapping of annotator name -> settings")
    return data


@dataclass(frozen=True)
class AnnotatorTemplate:
    """The prompt and parsing rule of an alpaca_eval log-prob annotator config."""

    config_name: str
    config_path: Path
    template_path: Path
    template: str
    numerator_token: str
    denominator_tokens: tuple[str, ...]


def load_annotator_template(config: str = OFFICIAL_ANNOTATOR) -> AnnotatorTemplate:
    """Read a log-prob annotator's prompt template and identifier tokens from the installed alpaca_eval."""
    config_path = resolve_annotator_config(config)
    configs = read_annotator_configs(config_path)
    if len(configs) != 1:
        raise JudgeError(f"{config_path}: the local judge needs a config with one annotator, found {list(configs)}")
    (name, settings), = configs.items()
    if settings.get("fn_completion_parser") != "logprob_parser":
        raise JudgeError(f"{config_path}: annotator {name!r} parses with {settings.get('fn_completion_parser')!r}; "
                         f"the local log-prob judge needs a 'logprob_parser' config such as {OFFICIAL_ANNOTATOR!r}")
    parser_kwargs = settings.get("completion_parser_kwargs") or {}
    if parser_kwargs.get("is_binarize"):
        raise JudgeError(f"{config_path}: is_binarize=true gives 1/2 votes, not weighted preferences; use a "
                         f"weighted config such as {OFFICIAL_ANNOTATOR!r}")
    template_path = config_path.parents[1] / settings["prompt_template"]
    if not template_path.is_file():
        raise JudgeError(f"{config_path}: prompt template {template_path} not found")
    return AnnotatorTemplate(
        config_name=name,
        config_path=config_path,
        template_path=template_path,
        template=template_path.read_text(encoding="utf-8"),
        numerator_token=parser_kwargs["numerator_token"],
        denominator_tokens=tuple(parser_kwargs["denominator_tokens"]),
    )


def format_annotator_prompt(template: str, instruction: str, output_1: str, output_2: str) -> str:
    """The filled-in template, by alpaca_eval's own ``make_prompts`` (first-occurrence replacement)."""
    import pandas as pd
    from alpaca_eval import utils

    frame = pd.DataFrame([{"instruction": instruction, "output_1": output_1, "output_2": output_2}])
    prompts, _ = utils.make_prompts(frame, template=template, batch_size=1)
    return prompts[0]


def annotator_messages(prompt: str) -> list[dict[str, str]]:
    """The ChatML-marked prompt as chat messages, split the way alpaca_eval sends it to chat models."""
    from alpaca_eval import utils

    return [{"role": m["role"], "content": m["content"]} for m in utils.prompt_to_chatml(prompt)]


def switch_decisions(instructions: Sequence[str], seed: int = ALPACA_EVAL_SWITCH_SEED) -> list[bool]:
    """Whether alpaca_eval's annotator swaps output_1/output_2 before prompting, per instruction.

    Runs alpaca_eval's own ``RandomSwitchTwoColumnsProcessor`` configured exactly as its
    ``SinglePairwiseAnnotator`` configures it (seeded on the instruction only).
    """
    import pandas as pd
    from alpaca_eval.processors import RandomSwitchTwoColumnsProcessor

    if not instructions:
        return []
    processor = RandomSwitchTwoColumnsProcessor(
        two_columns_to_switch=["output_1", "output_2"],
        random_seed_columns=["instruction"],
        _switch_column="is_switched_outputs",
        seed=seed,
    )
    frame = pd.DataFrame({"instruction": list(instructions), "output_1": "", "output_2": ""})
    return [bool(v) for v in processor.preprocess(frame)["is_switched_outputs"]]


def preference_from_top_logprobs(
    top_logprobs: dict[str, float],
    numerator_token: str = "m",
    denominator_tokens: Sequence[str] = ("m", "M"),
) -> float:
    """alpaca_eval's weighted log-prob rule: ``2 - P(numerator) / sum P(denominators)``.

    Tokens absent from ``top_logprobs`` have probability 0; NaN when none of them is present.
    """
    wanted = set(denominator_tokens) | {numerator_token}
    present = {t: float(lp) for t, lp in top_logprobs.items() if t in wanted}
    if not present:
        return math.nan
    numerator = present.get(numerator_token, -math.inf)
    denominator = [present.get(t, -math.inf) for t in denominator_tokens]
    peak = max(denominator)
    if peak == -math.inf:
        return 2.0
    log_total = peak + math.log(sum(math.exp(lp - peak) for lp in denominator))
    return 2.0 - math.exp(numerator - log_total)


# --------------------------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------------------------


class Judge(abc.ABC):
    """Judges (instruction, output_1, output_2) pairs; results carry ``preference`` in [1, 2] plus raw fields."""

    name: str = ""

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """What produced the judgements, recorded with every result (``annotator`` and metadata)."""

    @property
    def cache_identity(self) -> str:
        """Everything that changes a judgement; part of every cache key."""
        return self.label

    @property
    def weak_judge(self) -> bool:
        return False

    def check(self) -> None:
        """Raise JudgeError now if the judge cannot run (called before any generation starts)."""

    @abc.abstractmethod
    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        """Judge each pair, calling ``on_result(index, result)`` as soon as each result exists."""

    def metadata(self) -> dict[str, Any]:
        return {"judge": self.label, "weak_judge": self.weak_judge}


class LocalLogprobJudge(Judge):
    """A local causal LM scoring "m" vs "M" after alpaca_eval's official annotator prompt.

    The prompt is alpaca_eval's template filled by alpaca_eval's ``make_prompts``, split into system/user
    messages as alpaca_eval sends it to chat models, and rendered with the judge tokenizer's chat template.
    The identifier tokens are the ones the judge would emit first after the assistant header (checked to be
    single tokens). The template's fixed start (system turn and instructions up to the instruction text) is
    run once and its KV cache reused for every judgement.
    """

    name = "local_logprob"

    def __init__(
        self,
        model_spec: str | None = None,
        *,
        model: "PreTrainedModel | None" = None,
        tokenizer: "PreTrainedTokenizerBase | None" = None,
        annotator_config: str = OFFICIAL_ANNOTATOR,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
        switch_seed: int = ALPACA_EVAL_SWITCH_SEED,
        show_progress: bool = True,
    ):
        from steps.evaluate.generation import resolve_device
        from steps.models import DEFAULT_MODEL

        if max_output_chars < 1:
            raise JudgeError(f"max_output_chars must be >= 1, got {max_output_chars}")
        self.model_spec = model_spec or DEFAULT_MODEL
        self.annotator_config = annotator_config
        self.max_output_chars = max_output_chars
        self.device, self.dtype = resolve_device(device), dtype
        self.seed, self.switch_seed = seed, switch_seed
        self.show_progress = show_progress
        self._model, self._tokenizer = model, tokenizer
        self._template: AnnotatorTemplate | None = None
        self._identifier_ids: dict[str, int] | None = None
        self._prefix_ids: list[int] | None = None
        self._prefix_cache: Any = None
        self.forward_passes = 0
        self.judgements = 0
        self.seconds_judging = 0.0

    @property
    def label(self) -> str:
        return f"local_logprob:{self.model_spec}"

    @property
    def cache_identity(self) -> str:
        seed = f"|seed={self.seed}" if self.model_spec.startswith("tiny") else ""
        return (f"{self.label}|template={self.annotator_config}|max_output_chars={self.max_output_chars}"
                f"|switch_seed={self.switch_seed}{seed}")

    @property
    def weak_judge(self) -> bool:
        return self.model_spec in WEAK_JUDGE_SPECS or self.model_spec.startswith("tiny")

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "annotator_config": self.annotator_config,
                "max_output_chars": self.max_output_chars,
                "note": ("weak judge: checks the mechanism, not a quality signal" if self.weak_judge else "")}

    # -- setup --------------------------------------------------------------------------------------------------

    @property
    def template(self) -> AnnotatorTemplate:
        if self._template is None:
            self._template = load_annotator_template(self.annotator_config)
        return self._template

    @property
    def tokenizer(self) -> "PreTrainedTokenizerBase":
        if self._tokenizer is None:
            from steps.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_spec)
        return self._tokenizer

    @property
    def model(self) -> "PreTrainedModel":
        if self._model is None:
            from steps.models import load_model

            self._model = load_model(self.model_spec, dtype=self.dtype, device=self.device, seed=self.seed)
        return self._model

    def check(self) -> None:
        """Template readable, identifiers single tokens for this tokenizer (loads the tokenizer, not the model)."""
        self.identifier_ids()

    def render(self, instruction: str, output_1: str, output_2: str) -> str:
        """The full judge prompt text for a pair as presented (after any swap and cut)."""
        from steps.chat import render_prompt

        text = format_annotator_prompt(self.template.template, instruction, output_1, output_2)
        return render_prompt(self.tokenizer, annotator_messages(text))

    def identifier_ids(self) -> dict[str, int]:
        """Token id of each output identifier as the first token of the judge's answer."""
        if self._identifier_ids is None:
            tokens = dict.fromkeys([self.template.numerator_token, *self.template.denominator_tokens])
            prompt = self.render("instruction", "output one", "output two")
            base = self._encode(prompt)
            ids: dict[str, int] = {}
            for token in tokens:
                with_answer = self._encode(prompt + token)
                if len(with_answer) != len(base) + 1 or with_answer[:len(base)] != base:
                    raise JudgeError(
                        f"judge tokenizer of {self.model_spec!r} does not answer {token!r} with a single token after "
                        f"the prompt; the local log-prob judge needs single-token identifiers"
                    )
                ids[token] = with_answer[-1]
            if len(set(ids.values())) != len(ids):
                raise JudgeError(f"judge tokenizer of {self.model_spec!r} maps identifiers {list(ids)} to the same "
                                 f"token ids {ids}")
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
            cut = rendered.index(sentinel)
            self._prefix_ids = self._encode(rendered[:cut])[:-2]
        return self._prefix_ids

    # -- scoring ------------------------------------------------------------------------------------------------

    def _forward(self, input_ids: list[int], past: Any = None, keep_cache: bool = False):
        """One forward pass (counted) keeping only the last position's logits where the model allows it."""
        import torch

        model = self.model
        device = next(model.parameters()).device
        parameters = inspect.signature(model.forward).parameters
        kwargs: dict[str, Any] = {"use_cache": keep_cache or past is not None}
        if "logits_to_keep" in parameters:
            kwargs["logits_to_keep"] = 1
        if past is not None:
            kwargs[_cache_argument(parameters)] = past
        self.forward_passes += 1
        return model(input_ids=torch.tensor([input_ids], dtype=torch.long, device=device), **kwargs)

    def identifier_logprobs(self, prompt_ids: list[int]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Log-probabilities of each identifier as the next token, and the top-5 next tokens."""
        import torch

        prefix = self.shared_prefix_ids()
        with torch.inference_mode():
            if self._prefix_cache is None and len(prefix) > 0:
                out = self._forward(prefix, keep_cache=True)
                self._prefix_cache = getattr(out, _cache_argument(inspect.signature(self.model.forward).parameters))
            if prefix and len(prompt_ids) > len(prefix) and prompt_ids[:len(prefix)] == prefix:
                past = copy.deepcopy(self._prefix_cache)
                out = self._forward(prompt_ids[len(prefix):], past=past)
            else:
                logger.debug("prompt does not start with the cached template prefix; full forward pass")
                out = self._forward(prompt_ids)
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            top = torch.topk(logprobs, k=5)
        ids = self.identifier_ids()
        identifier = {token: float(logprobs[token_id]) for token, token_id in ids.items()}
        top5 = [{"token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                for v, i in zip(top.values.tolist(), top.indices.tolist())]
        return identifier, top5

    def judge_one(self, instruction: str, output_1: str, output_2: str, switched: bool) -> dict[str, Any]:
        started = time.monotonic()
        first, second = (output_2, output_1) if switched else (output_1, output_2)
        cut_first, cut_second = first[: self.max_output_chars], second[: self.max_output_chars]
        prompt_ids = self._encode(self.render(instruction, cut_first, cut_second))
        identifier, top5 = self.identifier_logprobs(prompt_ids)
        presented = preference_from_top_logprobs(identifier, self.template.numerator_token,
                                                 self.template.denominator_tokens)
        preference = 3.0 - presented if switched else presented
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
                "outputs_cut_at_chars": self.max_output_chars
                if max(len(first), len(second)) > self.max_output_chars else None,
            },
            "time_per_example": elapsed,
            "price_per_example": 0.0,
        }

    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        from tqdm.auto import tqdm

        switched = switch_decisions([p["instruction"] for p in pairs], seed=self.switch_seed)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for index in tqdm(range(len(pairs)), desc=f"judge {self.model_spec}", unit="judgement",
                              disable=not self.show_progress):
                pair = pairs[index]
                on_result(index, self.judge_one(pair["instruction"], pair["output_1"], pair["output_2"],
                                                switched[index]))
        finally:
            model.train(was_training)


def _credential_present(variable: str) -> bool:
    """An API key variable is set, or (for a client config path) the config file it names exists.

    alpaca_eval also reads an OpenAI client config from its default location when the variable is unset.
    """
    if variable == "OPENAI_CLIENT_CONFIG_PATH":
        from alpaca_eval import constants

        path = os.environ.get(variable) or str(constants.OPENAI_CLIENT_CONFIG_PATH)
        return Path(path).is_file()
    return bool(os.environ.get(variable))


def _cache_argument(parameters: Any) -> str:
    """transformers 5 calls the KV cache ``cache`` (argument and output); earlier versions ``past_key_values``."""
    return "cache" if "cache" in parameters else "past_key_values"


class AlpacaEvalJudge(Judge):
    """alpaca_eval's PairwiseAnnotator with one of its annotator configs (API judges need their key)."""

    name = "alpaca_eval"

    def __init__(self, config: str = OFFICIAL_ANNOTATOR, chunk_size: int = 8, **annotator_kwargs: Any):
        self.config = config
        self.config_path = resolve_annotator_config(config)
        self.chunk_size = chunk_size
        self.annotator_kwargs = annotator_kwargs

    @property
    def label(self) -> str:
        return f"alpaca_eval:{self.config}"

    def required_environment(self) -> list[tuple[str, tuple[str, ...], str | None]]:
        """(annotator, env vars of which one must be set, package) per annotator in the config."""
        needs = []
        for name, settings in read_annotator_configs(self.config_path).items():
            fn = settings.get("fn_completions")
            if isinstance(fn, str) and fn in COMPLETION_REQUIREMENTS:
                env, package = COMPLETION_REQUIREMENTS[fn]
                needs.append((name, env, package))
        return needs

    def check(self) -> None:
        """Keys (presence only: never read into logs or results) and packages each annotator needs."""
        for name, env, package in self.required_environment():
            if env and not any(_credential_present(var) for var in env):
                raise JudgeError(
                    f"judge {self.label} (annotator {name!r}) calls an API and needs {env[0]} in the environment "
                    f"(or {', '.join(env[1:])}); none is set. Export it before the run, or use the offline judge "
                    f"'local_logprob'."
                    if len(env) > 1 else
                    f"judge {self.label} (annotator {name!r}) needs {env[0]} in the environment; it is not set"
                )
            if package and importlib.util.find_spec(package) is None:
                raise JudgeError(f"judge {self.label} (annotator {name!r}) needs the package {package!r}, "
                                 f"which is not installed")

    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        from alpaca_eval.annotators import PairwiseAnnotator

        self.check()
        annotator = PairwiseAnnotator(annotators_config=self.config_path, caching_path=None, **self.annotator_kwargs)
        for start in range(0, len(pairs), self.chunk_size):
            chunk = [dict(instruction=p["instruction"], output_1=p["output_1"], output_2=p["output_2"])
                     for p in pairs[start:start + self.chunk_size]]
            started = time.monotonic()
            results = annotator.annotate_pairs(chunk)
            by_key = {(r["instruction"], r["output_1"], r["output_2"]): r for r in results}
            elapsed = (time.monotonic() - started) / max(len(chunk), 1)
            for offset, pair in enumerate(chunk):
                found = by_key.get((pair["instruction"], pair["output_1"], pair["output_2"]))
                if found is None:
                    logger.warning("alpaca_eval returned no annotation for pair %d", start + offset)
                    continue
                result = {k: v for k, v in found.items() if k not in ("instruction", "output_1", "output_2")}
                result.setdefault("time_per_example", elapsed)
                on_result(start + offset, result)


def make_judge(name: str = DEFAULT_JUDGE, **kwargs: Any) -> Judge:
    """``local_logprob`` or ``alpaca_eval:<annotator config name or path>``.

    Local judge kwargs: ``judge_model`` (a spec; ``model=`` with a string means the same), or a loaded ``model``
    and ``tokenizer``; ``max_output_chars`` (alias ``max_chars``), ``device``, ``dtype``. Options that only the
    local judge has are ignored for ``alpaca_eval:`` judges.
    """
    if isinstance(kwargs.get("model"), str):  # a spec given as ``model=``
        kwargs["judge_model"] = kwargs.pop("model")
    if "max_chars" in kwargs:
        kwargs["max_output_chars"] = kwargs.pop("max_chars")
    if kwargs.get("max_output_chars") is None:
        kwargs.pop("max_output_chars", None)
    if name == "local_logprob" or name.startswith("local_logprob:"):
        spec = kwargs.pop("judge_model", None) or kwargs.pop("model_spec", None)
        kwargs.pop("model_spec", None)
        if name.startswith("local_logprob:"):
            spec = name.split(":", 1)[1]
        return LocalLogprobJudge(spec, **kwargs)
    if name.startswith("alpaca_eval:"):
        config = name.split(":", 1)[1]
        if not config:
            raise JudgeError("judge 'alpaca_eval:' needs an annotator config, e.g. "
                             f"'alpaca_eval:{OFFICIAL_ANNOTATOR}'")
        for local_only in ("judge_model", "model_spec", "model", "tokenizer", "max_output_chars", "device", "dtype",
                           "show_progress"):
            kwargs.pop(local_only, None)
        return AlpacaEvalJudge(config, **kwargs)
    raise JudgeError(f"unknown judge {name!r}; use 'local_logprob' (offline), 'local_logprob:<model spec>' or "
                     f"'alpaca_eval:<annotator config>' (e.g. 'alpaca_eval:{OFFICIAL_ANNOTATOR}')")


# --------------------------------------------------------------------------------------------------------------
# Cache and annotation
# --------------------------------------------------------------------------------------------------------------


class AnnotationCache:
    """Append-only JSONL of judgements for one judge; one line per judgement, flushed as it is made.

    Keyed by sha256 of (judge identity, instruction, output_1, output_2). A line cut short by a crash is
    skipped on load (that one judgement is simply made again).
    """

    def __init__(self, cache_dir: str | os.PathLike, judge_identity: str):
        self.judge_identity = judge_identity
        digest = hashlib.sha256(judge_identity.encode("utf-8")).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", judge_identity)[:60]
        self.path = Path(cache_dir) / f"{slug}-{digest}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        self._entries[row["key"]] = row["result"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        logger.warning("%s:%d: unreadable cache line skipped (an interrupted write?)",
                                       self.path, lineno)
            logger.info("annotation cache %s: %d judgements", self.path, len(self._entries))

    def key(self, instruction: str, output_1: str, output_2: str) -> str:
        payload = json.dumps([self.judge_identity, instruction, output_1, output_2], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, result: dict[str, Any]) -> None:
        line = json.dumps({"key": key, "result": result}, ensure_ascii=False, default=str)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._entries[key] = result

    def __len__(self) -> int:
        return len(self._entries)


def pair_outputs(model_outputs: Sequence[dict[str, Any]], reference_outputs: Sequence[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """alpaca_eval rows (output_1 = reference, output_2 = model), paired by position; instructions must match."""
    if len(model_outputs) != len(reference_outputs):
        raise AnnotationInputError(f"{len(model_outputs)} model outputs but {len(reference_outputs)} reference "
                                   f"outputs; both must cover the same instructions in the same order")
    rows = []
    for index, (model_row, ref_row) in enumerate(zip(model_outputs, reference_outputs)):
        for side, row in (("model", model_row), ("reference", ref_row)):
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                    or not isinstance(row.get("output"), str):
                raise AnnotationInputError(f"{side} output {index} needs string 'instruction' and 'output' "
                                           f"fields, got {str(row)[:200]}")
        if model_row["instruction"] != ref_row["instruction"]:
            raise AnnotationInputError(
                f"row {index}: model and reference instructions differ ({model_row['instruction'][:80]!r} vs "
                f"{ref_row['instruction'][:80]!r}); outputs are paired by position, so both files must follow "
                f"the eval set's order"
            )
        row = {
            "instruction": ref_row["instruction"],
            "output_1": ref_row["output"],
            "generator_1": ref_row.get("generator", "reference"),
            "output_2": model_row["output"],
            "generator_2": model_row.get("generator", "model"),
        }
        dataset = ref_row.get("dataset", model_row.get("dataset"))
        if dataset is not None:
            row["dataset"] = dataset
        rows.append(row)
    return rows


def annotate(
    model_outputs: Sequence[dict[str, Any]],
    reference_outputs: Sequence[dict[str, Any]],
    judge: Judge,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Judge the model's outputs against the reference outputs, row by row, in alpaca_eval's annotation schema.

    Identical outputs get 1.5 without a judgement. With ``cache_dir``, earlier judgements are reused and each new
    one is written as soon as it is made.
    """
    rows = pair_outputs(model_outputs, reference_outputs)
    cache = AnnotationCache(cache_dir, judge.cache_identity) if cache_dir is not None else None
    results: list[dict[str, Any] | None] = [None] * len(rows)
    pending: list[int] = []
    n_cached = n_identical = 0
    for index, row in enumerate(rows):
        if row["output_1"] == row["output_2"]:
            results[index] = {"preference": 1.5, "raw_completion": None, "time_per_example": 0.0,
                              "price_per_example": 0.0}
            n_identical += 1
            continue
        cached = cache.get(cache.key(row["instruction"], row["output_1"], row["output_2"])) if cache else None
        if cached is not None:
            results[index] = cached
            n_cached += 1
        else:
            pending.append(index)
    logger.info("annotate with %s: %d rows, %d identical, %d cached, %d to judge", judge.label, len(rows),
                n_identical, n_cached, len(pending))

    def on_result(position: int, result: dict[str, Any]) -> None:
        index = pending[position]
        row = rows[index]
        if cache is not None:
            cache.put(cache.key(row["instruction"], row["output_1"], row["output_2"]), result)
        results[index] = result

    if pending:
        judge.judge_pairs([rows[i] for i in pending], on_result)
    annotations = []
    for row, result in zip(rows, results):
        record = dict(row)
        record["annotator"] = judge.label
        if result is None:
            record["preference"] = None
        else:
            record.update(result)
            record["annotator"] = judge.label
        annotations.append(record)
    missing = sum(r["preference"] is None for r in annotations)
    if missing:
        logger.warning("%d of %d rows have no judgement", missing, len(annotations))
    return annotations


# --------------------------------------------------------------------------------------------------------------
# Agreement with official judgements
# --------------------------------------------------------------------------------------------------------------


def judge_agreement(official: Sequence[dict[str, Any]], judge: Judge, limit: int | None = 30,
                    cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """How often ``judge`` picks the same winner as the official annotations (ties on either side excluded)."""
    rows = [r for r in official[:limit] if r.get("preference") is not None]
    model_outputs = [{"instruction": r["instruction"], "output": r["output_2"], "generator": r["generator_2"]}
                     for r in rows]
    reference_outputs = [{"instruction": r["instruction"], "output": r["output_1"], "generator": r["generator_1"]}
                         for r in rows]
    started = time.monotonic()
    mine = annotate(model_outputs, reference_outputs, judge, cache_dir=cache_dir)
    elapsed = time.monotonic() - started
    compared = agree = ties = 0
    for theirs, ours in zip(rows, mine):
        a, b = float(theirs["preference"]) - 1.5, (ours["preference"] or 1.5) - 1.5
        if a == 0 or b == 0:
            ties += 1
            continue
        compared += 1
        agree += (a > 0) == (b > 0)
    judged = [r for r in mine if (r.get("time_per_example") or 0) > 0]
    return {
        "judge": judge.label,
        "weak_judge": judge.weak_judge,
        "official_annotator": rows[0].get("annotator") if rows else None,
        "n_rows": len(rows),
        "n_compared": compared,
        "n_ties_excluded": ties,
        "n_agree": agree,
        "agreement": agree / compared if compared else None,
        "official_model_win_fraction": sum(float(r["preference"]) > 1.5 for r in rows) / len(rows) if rows else None,
        "judge_model_win_fraction": sum((r["preference"] or 1.5) > 1.5 for r in mine) / len(mine) if mine else None,
        "seconds_per_judgement": (sum(r["time_per_example"] for r in judged) / len(judged)) if judged else None,
        "wall_seconds": elapsed,
    }
