"""evaluation.benchmarks: parsing and validation of the lm-evaluation-harness task list, and the pure readers of
lm_eval's results (headline metric, standard error, report cells). None of this needs lm_eval installed."""

from __future__ import annotations

import math

import pytest

from steps.config import ConfigError, config_from_dict
from steps.evaluate.benchmark_specs import BenchmarkSpec, BenchmarkSpecError, parse_benchmarks
from steps.evaluate.harness import run_generation_kwargs
from steps.evaluate.harness_results import (
    BenchmarkResultError,
    default_metric_key,
    format_score,
    leaf_tasks,
    metric_values,
    row_fields,
    summarize_benchmark,
)
from steps.evaluate.settings import GenerationSettings


def test_names_mappings_and_comma_strings_parse_to_specs():
    specs = parse_benchmarks(["ifeval", {"task": "mmlu", "num_fewshot": 5, "limit": 20}, {"task": "gsm8k"}])
    assert specs == [
        BenchmarkSpec("ifeval"),
        BenchmarkSpec("mmlu", num_fewshot=5, limit=20),
        BenchmarkSpec("gsm8k"),
    ]
    assert parse_benchmarks("ifeval, arc_challenge") == [BenchmarkSpec("ifeval"), BenchmarkSpec("arc_challenge")]
    assert parse_benchmarks(None) == [] and parse_benchmarks([]) == []
    assert specs[0].chat_template is True and specs[0].generation == "run"


@pytest.mark.parametrize(
    ("value", "field", "words"),
    [
        ([{"task": "mmlu", "num_fewshot": "five"}], "benchmarks[0].num_fewshot", "integer >= 0"),
        (["ifeval", {"task": "mmlu", "limit": 0}], "benchmarks[1].limit", "integer >= 1"),
        ([{"task": "mmlu", "limit": True}], "benchmarks[0].limit", "integer >= 1"),
        ([{"task": "mmlu", "num_fewshots": 5}], "benchmarks[0].num_fewshots", "did you mean 'num_fewshot'"),
        ([{"num_fewshot": 5}], "benchmarks[0].task", "name the lm_eval task"),
        ([{"task": " mmlu"}], "benchmarks[0].task", "task name"),
        ([{"task": "gsm8k", "generation": "greedy"}], "benchmarks[0].generation", "run, task"),
        ([{"task": "gsm8k", "metric": "exact_match"}], "benchmarks[0].metric", "'<metric>,<filter>'"),
        ([{"task": "gsm8k", "chat_template": "yes"}], "benchmarks[0].chat_template", "true or false"),
        ([3], "benchmarks[0]", "expected a task name"),
        (["mmlu", {"task": "mmlu", "num_fewshot": 0}], "benchmarks[1].task", "listed twice"),
        ({"task": "mmlu"}, "benchmarks", "expected a list"),
    ],
)
def test_bad_entries_name_the_entry_and_key(value, field, words):
    with pytest.raises(BenchmarkSpecError) as caught:
        parse_benchmarks(value)
    assert caught.value.field == field
    assert words in str(caught.value)


def test_run_config_checks_the_list_at_its_dotted_key():
    config = config_from_dict({"evaluation": {"benchmarks": ["ifeval", {"task": "mmlu", "num_fewshot": 5}]}}, "c.yml")
    assert parse_benchmarks(config.evaluation.benchmarks)[1] == BenchmarkSpec("mmlu", num_fewshot=5)
    assert config_from_dict({}, "c.yml").evaluation.benchmarks == []
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"evaluation": {"benchmarks": [{"task": "mmlu", "limt": 5}]}}, "c.yml")
    assert str(caught.value).startswith("c.yml: evaluation.benchmarks[0].limt: unknown key (did you mean 'limit'?)")


def test_prefflow_sampling_replaces_the_tasks_and_keeps_its_stop_sequences():
    task = {"until": ["Question:", "</s>"], "do_sample": False, "temperature": 0.0, "max_new_tokens": 1280}
    sampled = run_generation_kwargs(task, GenerationSettings(max_new_tokens=64, temperature=0.7, top_p=0.9), ["<e>"])
    assert sampled == {
        "until": ["Question:", "</s>", "<e>"],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_gen_toks": 64,
    }
    greedy = run_generation_kwargs({"until": "\n", "top_p": 0.5}, GenerationSettings(temperature=0.0), ["\n"])
    assert greedy == {"until": ["\n"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 256}
    assert task["until"] == ["Question:", "</s>"]  # the task's own dict is not changed


# lm_eval's results for a group of two multiple-choice tasks and a generation task with two filters, in the
# shape simple_evaluate returns (values made up; the readers only reshape them)
RAW = {
    "results": {
        "grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_count": {"acc,none": 10}},
        "mc_a": {"alias": "mc_a", "acc,none": 0.4, "acc_stderr,none": 0.2, "acc_norm,none": 0.6},
        "mc_b": {"alias": "mc_b", "acc,none": 0.6, "acc_stderr,none": "N/A"},
        "gen": {
            "alias": "gen",
            "exact_match,flexible-extract": 0.25,
            "exact_match_stderr,flexible-extract": 0.05,
            "exact_match,strict-match": 0.125,
            "exact_match_stderr,strict-match": 0.04,
        },
    },
    "group_subtasks": {"grp": ["mc_a", "mc_b"]},
    "configs": {
        "mc_a": {"output_type": "multiple_choice", "metric_list": [{"metric": "acc"}]},
        "mc_b": {"output_type": "multiple_choice", "metric_list": [{"metric": "acc"}]},
        "gen": {
            "output_type": "generate_until",
            "metric_list": [{"metric": "exact_match"}],
            "filter_list": [{"name": "strict-match"}, {"name": "flexible-extract"}],
        },
    },
    "versions": {"grp": "3.0", "mc_a": 1.0, "mc_b": 2.0, "gen": 3.0},
    "n-shot": {"grp": 0, "mc_a": 0, "mc_b": 0, "gen": 5},
    "n-samples": {"mc_a": {"original": 8, "effective": 4}, "mc_b": {"original": 9, "effective": 6}},
    "higher_is_better": {"grp": {"acc": True}, "gen": {"exact_match": True}},
}


def test_metric_values_pair_each_metric_with_its_stderr():
    assert metric_values(RAW["results"]["mc_a"]) == {
        "acc,none": {"value": 0.4, "stderr": 0.2},
        "acc_norm,none": {"value": 0.6, "stderr": None},
    }
    assert metric_values(RAW["results"]["mc_b"])["acc,none"] == {"value": 0.6, "stderr": None}  # "N/A"


def test_the_headline_is_the_tasks_first_metric_under_its_first_filter():
    reported = list(metric_values(RAW["results"]["gen"]))
    assert reported[0] == "exact_match,flexible-extract"
    assert default_metric_key(RAW["configs"]["gen"], reported) == "exact_match,strict-match"
    assert default_metric_key(None, ["acc,none"]) == "acc,none"  # a group: what it reports first
    assert leaf_tasks(RAW, "grp") == ["mc_a", "mc_b"] and leaf_tasks(RAW, "gen") == ["gen"]


def test_a_group_summary_counts_its_subtasks_documents():
    entry = summarize_benchmark(BenchmarkSpec("grp", limit=6), RAW, {}, {})
    assert (entry["metric"], entry["value"], entry["stderr"]) == ("acc,none", 0.5, 0.1)
    assert (entry["n"], entry["n_total"], entry["limit"], entry["version"]) == (10, 17, 6, "3.0")
    assert entry["leaf_versions"] == {"mc_a": 1.0, "mc_b": 2.0}
    assert entry["output_types"] == ["multiple_choice"] and entry["percent"] and entry["higher_is_better"]
    other = summarize_benchmark(BenchmarkSpec("gen", metric="exact_match,flexible-extract"), RAW, {}, {})
    assert (other["value"], other["stderr"], other["num_fewshot"]) == (0.25, 0.05, 5)
    with pytest.raises(BenchmarkResultError, match="set its metric to one of them"):
        summarize_benchmark(BenchmarkSpec("gen", metric="acc,none"), RAW, {}, {})


def test_report_cells_show_rates_in_percent_with_their_standard_error():
    summary = {
        "benchmarks": {
            "mmlu": {"value": 0.4523, "stderr": 0.0041, "percent": True},
            "wikitext": {"value": 12.34, "stderr": None, "percent": False},
        }
    }
    fields = row_fields(summary)
    assert math.isclose(fields["mmlu"], 45.23) and math.isclose(fields["mmlu_se"], 0.41)
    assert fields["wikitext"] == 12.34 and fields["wikitext_se"] is None
    assert format_score(summary["benchmarks"]["mmlu"]) == "45.2 ± 0.4"
    assert format_score(summary["benchmarks"]["wikitext"]) == "12.3"
    assert format_score({"value": None}) == "n/a"
