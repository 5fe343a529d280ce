"""``alpaca_eval:<config>``: alpaca_eval's own PairwiseAnnotator with one of its annotator configs, after checking
that the API keys and packages its completion functions need are there (presence only: keys are never read)."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steps.evaluate.judges.annotator_prompt import (
    OFFICIAL_ANNOTATOR,
    prompt_template_path,
    read_annotator_configs,
    resolve_annotator_config,
)
from steps.evaluate.judges.base import ENDPOINT_ALPACA_EVAL, Judge, JudgeError, JudgeProtocol, JudgeSettings
from steps.evaluate.judges.registry import register_judge

logger = logging.getLogger(__name__)

#: Environment variables each alpaca_eval completion function needs (any one of them), and its package.
COMPLETION_REQUIREMENTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "openai_completions": (("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"), "openai"),
    "anthropic_completions": (("ANTHROPIC_API_KEY",), "anthropic"),
    "cohere_completions": (("COHERE_API_KEY",), "cohere"),
    "bedrock_anthropic_completions": ((), "boto3"),
    "vllm_local_completions": ((), "vllm"),
    "huggingface_local_completions": ((), "transformers"),
}


def _credential_present(variable: str) -> bool:
    """An API key variable is set, or (for a client config path) the config file it names exists.

    alpaca_eval also reads an OpenAI client config from its default location when the variable is unset.
    """
    if variable == "OPENAI_CLIENT_CONFIG_PATH":
        from alpaca_eval import constants

        path = os.environ.get(variable) or str(constants.OPENAI_CLIENT_CONFIG_PATH)
        return Path(path).is_file()
    return bool(os.environ.get(variable))


@register_judge("alpaca_eval")
class AlpacaEvalJudge(Judge):
    """alpaca_eval's PairwiseAnnotator with one of its annotator configs (API judges need their key)."""

    argument = "annotator config"
    argument_required = True
    usage = (f"'alpaca_eval:<annotator config>' (e.g. 'alpaca_eval:{OFFICIAL_ANNOTATOR}')",)

    def __init__(self, config: str = OFFICIAL_ANNOTATOR, chunk_size: int = 8, **annotator_kwargs: Any):
        self.config = config
        self.config_path = resolve_annotator_config(config)
        self.chunk_size = chunk_size
        self.annotator_kwargs = annotator_kwargs

    @classmethod
    def from_options(cls, argument: str | None, options: JudgeSettings) -> Judge:
        """The config after ``alpaca_eval:``; only the keywords beyond the evaluation knobs reach the annotator."""
        if not argument:
            raise JudgeError(f"judge 'alpaca_eval:' needs an annotator config, e.g. 'alpaca_eval:{OFFICIAL_ANNOTATOR}'")
        return cls(argument, **options.extra)

    @property
    def label(self) -> str:
        return f"alpaca_eval:{self.config}"

    @property
    def price_model(self) -> str | None:
        """The model of the config's first annotator (what alpaca_eval bills), None for local completions."""
        for settings in read_annotator_configs(self.config_path).values():
            if settings.get("fn_completions") in ("vllm_local_completions", "huggingface_local_completions"):
                return None
            model_name = (settings.get("completions_kwargs") or {}).get("model_name")
            if model_name:
                return str(model_name)
        return None

    def protocol(self) -> JudgeProtocol:
        """An alpaca_eval annotator: the model of its config's first annotator that names one, and the prompt
        template of each of its annotators, in the config's order."""
        configs = read_annotator_configs(self.config_path)
        models = [(s.get("completions_kwargs") or {}).get("model_name") for s in configs.values()]
        model = next((str(m) for m in models if m), None)
        templates = tuple(
            prompt_template_path(self.config_path, s).read_text(encoding="utf-8") for s in configs.values()
        )
        return JudgeProtocol(ENDPOINT_ALPACA_EVAL, model, self.config, templates)

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
                    if len(env) > 1
                    else f"judge {self.label} (annotator {name!r}) needs {env[0]} in the environment; it is not set"
                )
            if package and importlib.util.find_spec(package) is None:
                raise JudgeError(
                    f"judge {self.label} (annotator {name!r}) needs the package {package!r}, which is not installed"
                )

    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        from alpaca_eval.annotators import PairwiseAnnotator

        self.check()
        annotator = PairwiseAnnotator(annotators_config=self.config_path, caching_path=None, **self.annotator_kwargs)
        for start in range(0, len(pairs), self.chunk_size):
            chunk = [
                dict(instruction=p["instruction"], output_1=p["output_1"], output_2=p["output_2"])
                for p in pairs[start : start + self.chunk_size]
            ]
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
