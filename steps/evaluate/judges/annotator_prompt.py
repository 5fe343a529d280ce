"""alpaca_eval's annotator pieces, read from the installed package: annotator configs, the prompt template,
the seeded output swap and the weighted log-prob rule that turns "m"/"M" probabilities into a preference, and
the base of the judges that apply them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from steps.evaluate.judges.base import Judge, JudgeError, JudgeProtocol

OFFICIAL_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
#: The seed alpaca_eval's PairwiseAnnotator passes to its output-order switch (its ``seed`` default, 0);
#: checked against the official annotations, where it explains the order of every judged row.
ALPACA_EVAL_SWITCH_SEED = 0


@dataclass(frozen=True)
class AnnotatorProtocol:
    """Which alpaca_eval log-prob annotator a judge imitates (its template and identifier tokens) and the seed of
    its output-order coin: together with the judge model, what decides a judgement."""

    annotator_config: str = OFFICIAL_ANNOTATOR
    switch_seed: int = ALPACA_EVAL_SWITCH_SEED


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
    suggested = (
        OFFICIAL_ANNOTATOR,
        "alpaca_eval_gpt4_turbo_fn",
        "weighted_alpaca_eval_gpt-4o-mini-2024-07-18",
        "alpaca_eval_llama3_70b_fn",
        "weighted_alpaca_eval_vllm_llama3_70b",
    )
    preferred = [n for n in suggested if n in names]
    raise JudgeError(
        f"unknown alpaca_eval annotator {name_or_path!r}: not a config in {evaluators_configs_dir()} and not a "
        f"path to a configs.yaml. Available include: {', '.join(preferred or names[:8])} "
        f"({len(names)} in total). The official AlpacaEval 2 judge is {OFFICIAL_ANNOTATOR!r}."
    )


def read_annotator_configs(config_path: Path) -> dict[str, dict[str, Any]]:
    """A ``configs.yaml``: annotator name -> its settings."""
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


def prompt_template_path(config_path: Path, settings: dict[str, Any]) -> Path:
    """The prompt template file an annotator's settings name (relative to the configs directory, as alpaca_eval
    resolves it); a clear error when the config names none or the file is missing."""
    name = settings.get("prompt_template")
    if not isinstance(name, str) or not name:
        raise JudgeError(f"{config_path}: an annotator names no prompt_template; add the template file's path")
    template_path = config_path.parents[1] / name
    if not template_path.is_file():
        raise JudgeError(f"{config_path}: prompt template {template_path} not found")
    return template_path


def load_annotator_template(config: str = OFFICIAL_ANNOTATOR) -> AnnotatorTemplate:
    """Read a log-prob annotator's prompt template and identifier tokens from the installed alpaca_eval."""
    config_path = resolve_annotator_config(config)
    configs = read_annotator_configs(config_path)
    if len(configs) != 1:
        raise JudgeError(f"{config_path}: the local judge needs a config with one annotator, found {list(configs)}")
    ((name, settings),) = configs.items()
    if settings.get("fn_completion_parser") != "logprob_parser":
        raise JudgeError(
            f"{config_path}: annotator {name!r} parses with {settings.get('fn_completion_parser')!r}; "
            f"the local log-prob judge needs a 'logprob_parser' config such as {OFFICIAL_ANNOTATOR!r}"
        )
    parser_kwargs = settings.get("completion_parser_kwargs") or {}
    if parser_kwargs.get("is_binarize"):
        raise JudgeError(
            f"{config_path}: is_binarize=true gives 1/2 votes, not weighted preferences; use a "
            f"weighted config such as {OFFICIAL_ANNOTATOR!r}"
        )
    template_path = prompt_template_path(config_path, settings)
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


class AnnotatorPromptJudge(Judge):
    """A judge shown alpaca_eval's annotator prompt: its template, its seeded output swap and its weighted rule.

    ``judge_model`` is what judges: a model spec for a local judge, the served model's name for a served one.
    """

    #: The endpoint kind a row's provenance names (``steps.evaluate.judges.base.ENDPOINT_*``); set by each kind.
    endpoint: str

    def __init__(self, judge_model: str, protocol: AnnotatorProtocol) -> None:
        self.judge_model = judge_model
        self.annotator_config = protocol.annotator_config
        self.switch_seed = protocol.switch_seed
        self._template: AnnotatorTemplate | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.judge_model}"

    @property
    def template(self) -> AnnotatorTemplate:
        if self._template is None:
            self._template = load_annotator_template(self.annotator_config)
        return self._template

    def messages(self, instruction: str, output_1: str, output_2: str) -> list[dict[str, str]]:
        """The system/user chat messages of the filled-in template for a pair, in the order given."""
        return annotator_messages(format_annotator_prompt(self.template.template, instruction, output_1, output_2))

    def switches(self, pairs: Sequence[dict[str, str]]) -> list[bool]:
        """Per pair, whether the judge is shown output_2 first (alpaca_eval's coin, seeded by the instruction)."""
        return switch_decisions([p["instruction"] for p in pairs], seed=self.switch_seed)

    def preference(self, logprobs: dict[str, float], switched: bool) -> float:
        """The preference for the pair as given (1: output_1 wins), from log-probs of the order as presented."""
        presented = preference_from_top_logprobs(
            logprobs, self.template.numerator_token, self.template.denominator_tokens
        )
        return 3.0 - presented if switched else presented

    def protocol(self) -> JudgeProtocol:
        """The endpoint kind, the judging model, the annotator config and the template text every prompt is made of."""
        return JudgeProtocol(self.endpoint, self.judge_model, self.annotator_config, (self.template.template,))

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "annotator_config": self.annotator_config}
