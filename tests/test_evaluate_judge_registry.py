"""Judges by registry: a judge kind is one ``@register_judge`` class that builds itself from the evaluation options;
``make_judge`` looks the name up (did-you-mean for typos); the config's judge defaults are the judge modules'."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from steps.config.schema import EvaluationConfig
from steps.evaluate import annotate, make_judge
from steps.evaluate.judges import (
    DEFAULT_CONCURRENCY,
    DEFAULT_JUDGE,
    DEFAULT_TIMEOUT_S,
    AlpacaEvalJudge,
    DuplicateJudgeError,
    Judge,
    JudgeError,
    JudgeSettings,
    LocalLogprobJudge,
    ServedJudge,
    judge_class,
    register_judge,
    registered_judges,
)
from steps.evaluate.settings import JUDGE_OPTIONS

LISTING = (
    "use 'local_logprob' (offline), 'local_logprob:<model spec>', 'openai_compatible' (a served model, e.g. vLLM) "
    "or 'alpaca_eval:<annotator config>' (e.g. 'alpaca_eval:weighted_alpaca_eval_gpt4_turbo')"
)


@pytest.fixture()
def scratch_registry(monkeypatch):
    """Judges registered in a test are gone after it."""
    from steps.evaluate.judges import registry

    monkeypatch.setattr(registry, "_JUDGES", dict(registry._JUDGES))


class LengthJudge(Judge):
    """Prefers the longer output: preference = 1 + len2^p / (len1^p + len2^p), ``p`` after ``length:`` (default 1)."""

    argument = "power"
    usage = ("'length[:<power>]'",)

    def __init__(self, power: float) -> None:
        self.power = power

    @classmethod
    def from_options(cls, argument: str | None, options: JudgeSettings) -> Judge:
        return cls(float(argument) if argument else 1.0)

    @property
    def label(self) -> str:
        return f"length:{self.power:g}"

    def judge_pairs(self, pairs: Sequence[dict[str, str]], on_result: Callable[[int, dict[str, Any]], None]) -> None:
        for index, pair in enumerate(pairs):
            first, second = len(pair["output_1"]) ** self.power, len(pair["output_2"]) ** self.power
            on_result(index, {"preference": 1 + second / (first + second), "raw_completion": None})


def test_the_shipped_judges_are_registered_under_their_names():
    assert registered_judges() == ("local_logprob", "openai_compatible", "alpaca_eval")
    assert registered_judges()[0] == DEFAULT_JUDGE
    assert judge_class("local_logprob:tiny") is LocalLogprobJudge
    assert judge_class("openai_compatible") is ServedJudge
    assert judge_class("alpaca_eval:x") is AlpacaEvalJudge
    assert [judge_class(n).name for n in registered_judges()] == list(registered_judges())


def test_a_registered_class_is_a_judge_by_name(scratch_registry):
    """What one new module under steps/evaluate/judges/ does: register a class; make_judge and annotate use it."""
    register_judge("length")(LengthJudge)
    model = [{"instruction": "a", "output": "four"}, {"instruction": "b", "output": "xy"}]
    ref = [{"instruction": "a", "output": "twelve chars"}, {"instruction": "b", "output": "xy"}]
    rows = annotate(model, ref, make_judge("length:2"))
    # output_1 is the reference: 12 and 4 characters -> 1 + 16 / (144 + 16); identical outputs -> 1.5, not judged
    assert [r["preference"] for r in rows] == [pytest.approx(1.1), 1.5]
    assert {r["annotator"] for r in rows} == {"length:2"}
    assert make_judge("length", judge_model="ignored", device="cpu").label == "length:1"
    assert "length" in registered_judges() and "'length[:<power>]'" in str(_unknown("lenght"))


def _unknown(name: str) -> JudgeError:
    with pytest.raises(JudgeError) as caught:
        make_judge(name)
    return caught.value


def test_unknown_names_list_every_spelling_and_suggest_the_nearest():
    assert str(_unknown("gpt5_oracle")) == f"unknown judge 'gpt5_oracle'; {LISTING}"
    assert (
        str(_unknown("local_logprobs")) == f"unknown judge 'local_logprobs' (did you mean 'local_logprob'?); {LISTING}"
    )
    assert "(did you mean 'openai_compatible'?)" in str(_unknown("openai-compatible:my-model"))
    assert str(_unknown("alpaca_eval")) == (
        "judge 'alpaca_eval:' needs an annotator config, e.g. 'alpaca_eval:weighted_alpaca_eval_gpt4_turbo'"
    )


def test_registration_is_checked(scratch_registry):
    with pytest.raises(DuplicateJudgeError, match="'local_logprob' is already registered by"):
        register_judge("local_logprob")(LengthJudge)
    with pytest.raises(TypeError, match="concrete Judge subclass"):
        register_judge("abstract")(Judge)
    with pytest.raises(TypeError, match="usage must say"):
        register_judge("unnamed")(type("Unnamed", (LengthJudge,), {"usage": ()}))
    with pytest.raises(ValueError, match="lower-case"):
        register_judge("Bad Name")
    no_argument = register_judge("fixed")(type("Fixed", (LengthJudge,), {"argument": None}))
    assert make_judge("fixed").label == "length:1"
    with pytest.raises(JudgeError, match="judge 'fixed' takes nothing after ':', got 'fixed:2'"):
        make_judge("fixed:2")
    assert no_argument.name == "fixed"


def test_every_config_knob_reaches_the_judge_as_a_setting():
    """The evaluation section's judge knobs are JudgeSettings fields, not 'extra' keywords a judge would refuse."""
    fields = {f.name for f in dataclasses.fields(JudgeSettings)}
    assert set(JUDGE_OPTIONS) <= fields
    config = EvaluationConfig()
    assert make_judge(config.judge, device="cpu", **config.judge_options()).cache_identity == (
        make_judge(device="cpu").cache_identity
    )


def test_the_config_and_the_served_judge_share_their_defaults():
    config = EvaluationConfig(judge="openai_compatible", judge_model="m", judge_base_url="http://localhost:1/v1")
    from_config = make_judge(config.judge, **config.judge_options())
    bare = make_judge("openai_compatible:m", judge_base_url="http://localhost:1/v1")
    assert isinstance(from_config, ServedJudge) and isinstance(bare, ServedJudge)
    assert (from_config.timeout_s, from_config.concurrency) == (bare.timeout_s, bare.concurrency) == (120.0, 4)
    assert (DEFAULT_TIMEOUT_S, DEFAULT_CONCURRENCY) == (120.0, 4)


def test_served_judge_keywords_beyond_the_knobs():
    served = {"judge_model": "m", "judge_base_url": "http://localhost:1/v1"}
    judge = make_judge("openai_compatible", max_retries=2, backoff_s=0.5, switch_seed=3, **served)
    assert isinstance(judge, ServedJudge)
    assert (judge.max_retries, judge.backoff_s, judge.max_backoff_s, judge.switch_seed) == (2, 0.5, 60.0, 3)
    assert "switch_seed=3" in judge.cache_identity
    with pytest.raises(JudgeError, match="max_retries must be an integer >= 0"):
        make_judge("openai_compatible", max_retries=-1, **served)
    with pytest.raises(JudgeError, match=r"options \['chunk_size'\] are not for judge 'openai_compatible'"):
        make_judge("openai_compatible", chunk_size=2, **served)
