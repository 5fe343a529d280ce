"""IFBench in the flow: the evaluate step's IFBench on the tiny model (a 3-prompt subset) equals the package's own
evaluation of the responses it saved; the join's paired IFBench Δ against a hand and numpy computation; the config
section's checks; the report's IFBench and lm-eval cells."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from steps.config import ConfigError, EvaluationConfig, IFBenchConfig, load_config
from steps.evaluate import EvalContext, GenerationSettings, ModelRun, PairedVs
from steps.evaluate.benchmark_suite import evaluate_benchmarks
from steps.evaluate.ifbench_eval import IFBENCH_RESPONSES_FILE, IFBENCH_RESULTS_FILE, evaluate_ifbench
from steps.evaluate.paired_ifbench import add_paired_ifbench
from steps.evaluate.results import Accuracy, BenchmarkScore, HarnessResult, VerifiableFiles, VerifiableResult
from steps.evaluate.verifiable.ifbench import load_ifbench
from steps.evaluate.verifiable.ifbench_scoring import PromptResult, Verdict
from steps.evaluate.verifiable.ifbench_source import PROMPTS_FILE
from steps.evaluate.verifiable.offline_verifiers import InterceptedDownloads, nltk_downloads_intercepted
from steps.io import read_json, read_jsonl, write_json
from steps.report import Selection, render_report
from steps.report.plots import benchmark_bars_png, benchmark_values
from steps.report.rows import typed_result_row
from steps.report.table import COLUMNS, markdown_table, results_csv
from tests.eval_results import alpaca_eval_result, provenance, variant_result


def test_ifbench_on_tiny_equals_the_package_evaluation_of_its_saved_responses(tiny_model_factory, tokenizer, tmp_path):
    context = EvalContext(
        generator="prefflow-tiny",
        out_dir=tmp_path / "eval",
        run=ModelRun(model=tiny_model_factory(seed=1), tokenizer=tokenizer, show_progress=False),
    )
    result = evaluate_ifbench("tiny", 3, GenerationSettings(max_new_tokens=8, batch_size=3), context)

    responses = read_jsonl(tmp_path / "eval" / IFBENCH_RESPONSES_FILE)
    assert result.files.responses == str(tmp_path / "eval" / IFBENCH_RESPONSES_FILE)
    assert len(responses) == 3 and all(r["generator"] == "prefflow-tiny" for r in responses)
    # the package's own evaluation (evaluation_lib on its own prompt reader) of the saved responses
    bench = load_ifbench(limit=3)
    lib = bench.verifiers.evaluation_lib
    by_prompt = {r["prompt"]: r["response"] for r in responses}
    all_inputs = lib.read_prompt_list(str(bench.package_dir / PROMPTS_FILE))
    inputs = [i for i in all_inputs if i.prompt in by_prompt]
    assert sorted(str(i.key) for i in inputs) == sorted(r["key"] for r in responses)
    followed: dict[str, list[bool]] = {"strict": [], "loose": []}
    instructions: dict[str, list[bool]] = {"strict": [], "loose": []}
    with nltk_downloads_intercepted(InterceptedDownloads()):
        for mode, check in (
            ("strict", lib.test_instruction_following_strict),
            ("loose", lib.test_instruction_following_loose),
        ):
            for example in inputs:
                try:
                    flags = check(example, by_prompt).follow_instruction_list
                except LookupError:  # verifier needs NLTK data not on this machine: left out
                    continue
                followed[mode].append(all(flags))
                instructions[mode].extend(flags)
    for mode, prompt_acc, instr_acc in (
        ("strict", result.prompt_strict, result.instruction_strict),
        ("loose", result.prompt_loose, result.instruction_loose),
    ):
        assert prompt_acc.n_scored == len(followed[mode]) and prompt_acc.n_scored + prompt_acc.n_unscored == 3
        if followed[mode]:
            p = sum(followed[mode]) / len(followed[mode])
            assert prompt_acc.accuracy == pytest.approx(100 * p)
            assert prompt_acc.standard_error == pytest.approx(100 * np.sqrt(p * (1 - p) / len(followed[mode])))
            assert instr_acc.accuracy == pytest.approx(100 * sum(instructions[mode]) / len(instructions[mode]))
    saved = read_json(tmp_path / "eval" / IFBENCH_RESULTS_FILE)
    assert [r["key"] for r in saved["results"]] == [r["key"] for r in responses]
    assert result.n_prompts == 3 and result.provenance["n_prompts"] == 3 and result.provenance["limit"] == 3
    assert result.generation["max_new_tokens"] == 8 and result.generation["dtype"] == "float32"


def test_benchmark_suite_runs_what_the_config_asks(tmp_path):
    off = EvaluationConfig(ifbench=IFBenchConfig(enabled=False))
    context = EvalContext(generator="g", out_dir=tmp_path)
    assert evaluate_benchmarks("tiny", off, context) == (None, None)  # nothing generated, nothing written
    assert not any(tmp_path.iterdir())


def test_config_section_defaults_and_errors(tmp_path):
    assert EvaluationConfig().ifbench.enabled is True and EvaluationConfig().ifbench.limit == 57
    assert load_config(overrides={"evaluation.ifbench.limit": None}).evaluation.ifbench.limit is None
    for bad, message in ((0, "between 1 and 294"), (295, "between 1 and 294"), ("all", "expected an integer")):
        with pytest.raises(ConfigError) as err:
            load_config(overrides={"evaluation.ifbench.limit": bad})
        assert err.value.key == "evaluation.ifbench.limit" and message in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"evaluation.ifbench.enable": False})
    assert err.value.key == "evaluation.ifbench.enable" and "enabled" in str(err.value)


# ------------------------------------------------------------------------------------- the join's paired Δ


def _prompt(key: str, flags: list[bool | None], ids: tuple[str, ...] | None = None) -> PromptResult:
    verdicts = tuple(Verdict(f, "missing NLTK data stopwords" if f is None else None) for f in flags)
    return PromptResult(key, ids or tuple(f"t:{i}" for i in range(len(flags))), verdicts, verdicts)


def _ifbench(tmp_path, name: str, prompts: list[PromptResult]) -> VerifiableResult:
    path = write_json(tmp_path / f"{name}.json", {"results": [p.to_record() for p in prompts]})
    stat = Accuracy(50.0, 10.0, len(prompts), 0)
    provenance = {"prompt_set_sha256": "ab" * 32, "n_prompts": len(prompts)}
    files = VerifiableFiles(str(tmp_path / f"{name}.jsonl"), str(path))
    return VerifiableResult("IFBench", stat, stat, stat, stat, len(prompts), {}, provenance, files, 0.1)


def _row(variant: str, ifbench: VerifiableResult | None):
    row = variant_result(variant, alpaca_eval_result())
    return dataclasses.replace(row, evaluation=dataclasses.replace(row.evaluation, ifbench=ifbench))


def test_join_pairs_ifbench_prompt_strict_accuracy_with_the_baseline(tmp_path):
    sft_flags = [True, False, False, True, False, None, True, False, True, False]
    dpo_flags = [True, True, False, True, True, True, False, True, None, False]
    sft = [_prompt(str(i), [f]) for i, f in enumerate(sft_flags)]
    dpo = [_prompt(str(i), [f]) for i, f in enumerate(dpo_flags)]
    other = [_prompt("0", [True], ids=("x:other",))]  # same key, another instruction: another prompt set
    rows = [
        _row("dpo", _ifbench(tmp_path, "dpo", dpo)),
        _row("sft", _ifbench(tmp_path, "sft", list(reversed(sft)))),  # paired by key, not by position
        _row("orpo", None),
        _row("simpo", _ifbench(tmp_path, "simpo", other)),
    ]
    settings = EvaluationConfig(paired_resamples=2000, paired_seed=7)
    out = {r.variant: r.paired_ifbench for r in add_paired_ifbench(rows, settings)}

    assert out["sft"] == PairedVs("sft", is_baseline=True) and out["orpo"] is None
    assert out["simpo"] is not None and out["simpo"].comparison is None
    assert "different instructions" in (out["simpo"].unavailable or "")
    # by hand: prompts 5 (sft unscored) and 8 (dpo unscored) drop out; 8 pairs left, in the row's prompt order
    diffs = [float(d) - float(s) for s, d in zip(sft_flags, dpo_flags, strict=True) if s is not None and d is not None]
    assert diffs == [0.0, 1.0, 0.0, 0.0, 1.0, -1.0, 1.0, 0.0]
    paired = out["dpo"]
    assert paired is not None and paired.baseline == "sft" and paired.comparison is not None
    numbers = paired.comparison
    assert numbers["mode"] == "strict" and numbers["n"] == 8 and numbers["n_unscored_in_either"] == 2
    assert numbers["delta"] == pytest.approx(100 * 2 / 8)
    d = np.asarray(diffs)
    idx = np.random.default_rng(7).integers(0, len(d), size=(2000, len(d)))
    low, high = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    assert numbers["ci95"] == pytest.approx([100 * low, 100 * high], abs=1e-9)
    assert numbers["distinguishable"] is bool(low > 0 or high < 0)


def test_join_refuses_an_ifbench_delta_between_answers_made_otherwise_but_not_between_judges(tmp_path):
    prompts = [_prompt(str(i), [i % 2 == 0]) for i in range(4)]

    def row(variant: str, **changes):
        made = _row(variant, _ifbench(tmp_path, variant, prompts))
        scored = alpaca_eval_result(provenance=provenance(**changes))
        return dataclasses.replace(made, evaluation=dataclasses.replace(made.evaluation, alpaca_eval=scored))

    hotter = dict(provenance().decoding, temperature=0.7)
    rows = [
        row("sft"),
        row("dpo", judge_model="gpt-4o", judge_endpoint="served"),  # another judge: IFBench needs none
        row("simpo", decoding=hotter),
        row("orpo", eval_dtype="bfloat16"),
    ]
    out = {r.variant: r.paired_ifbench for r in add_paired_ifbench(rows, EvaluationConfig(paired_resamples=100))}
    assert out["dpo"] is not None and out["dpo"].comparison is not None and out["dpo"].comparison["delta"] == 0.0
    for variant, what in (("simpo", "temperature"), ("orpo", "bfloat16")):
        paired = out[variant]
        assert paired is not None and paired.comparison is None
        assert paired.unavailable is not None and paired.unavailable.startswith("not paired with sft")
        assert what in paired.unavailable


def test_join_without_a_baseline_ifbench_leaves_rows_alone(tmp_path):
    rows = [_row("sft", None), _row("dpo", _ifbench(tmp_path, "dpo", [_prompt("1", [True])]))]
    assert add_paired_ifbench(rows, EvaluationConfig()) == rows
    assert add_paired_ifbench(rows, EvaluationConfig(paired_baseline=None)) == rows


# ------------------------------------------------------------------------------------------------ report cells


def test_report_shows_ifbench_delta_and_benchmark_columns(tmp_path):
    from steps.report.records import RunRecord

    sft_result = dataclasses.replace(
        _ifbench(tmp_path, "sft", [_prompt("1", [True])]),
        prompt_strict=Accuracy(12.281, 4.3456, 48, 9),
        provenance={"prompt_set_sha256": "0123456789abcdef" * 4, "n_prompts": 57},
        n_prompts=57,
    )
    harness = HarnessResult(
        (BenchmarkScore("arith", "exact_match,none", 40.0, 5.0, True, 10, 0, 1.0),), "0.4", "float32", "cpu", "b.json"
    )
    sft = _row("sft", sft_result)
    sft = dataclasses.replace(
        sft,
        evaluation=dataclasses.replace(sft.evaluation, benchmarks=harness),
        paired_ifbench=PairedVs("sft", is_baseline=True),
    )
    comparison = {"delta": 3.5, "ci95": [-1.25, 8.0], "distinguishable": False}
    dpo = dataclasses.replace(_row("dpo", sft_result), paired_ifbench=PairedVs("sft", comparison=comparison))
    from datetime import datetime, timezone

    record = RunRecord("PrefFlow", "7", datetime(2025, 1, 3, tzinfo=timezone.utc), [], [], True, [sft, dpo])
    rows = [typed_result_row(record, r) for r in (sft, dpo)]
    lines = [ln for ln in markdown_table(rows, links=False).splitlines() if ln.startswith("|")]
    header, _, sft_cells, dpo_cells = ([c.strip() for c in ln.strip("|").split(" | ")] for ln in lines)
    assert header == [*COLUMNS, "arith ± s.e."] and COLUMNS[-2:] == [
        "IFBench (strict, prompt) ± s.e.",
        "Δ IFBench vs Baseline [95% CI]",
    ]
    assert sft_cells[-3:] == ["12.28 ± 4.35 (48/57 scored)", "— (baseline)", "40.00 ± 5.00"]
    assert dpo_cells[-3:] == [
        "12.28 ± 4.35 (48/57 scored)",
        "+3.50 [-1.25, +8.00] vs SFT: not distinguishable from SFT",
        "n/a",
    ]
    exported = results_csv(rows).splitlines()
    fields = exported[0].split(",")
    assert fields[-2:] == ["lm_eval_arith", "lm_eval_arith_se"] and "paired_delta_ifbench" in fields
    assert json.loads(json.dumps(rows[1].paired_ifbench_ci95)) == [-1.25, 8.0]
    assert rows[0].ifbench_prompt_set == "0123456789ab"
    # the report writer puts the benchmark bars beside the win-rate plot, and its README shows them
    files, _ = render_report([record], Selection())
    assert files["plots/benchmarks.png"].startswith(b"\x89PNG") and "plots/win_rates.png" in files
    assert "![Benchmarks across runs](plots/benchmarks.png)" in files["README.md"].decode()
    assert benchmark_values(rows[0]) == {
        "IFBench\nprompt strict": (12.281, 4.3456),
        "IFBench\nprompt loose": (50.0, 10.0),
        "IFBench\ninstr. strict": (50.0, 10.0),
        "IFBench\ninstr. loose": (50.0, 10.0),
        "arith": (40.0, 5.0),
    }
    assert benchmark_bars_png([dataclasses.replace(rows[0], ifbench_prompt_strict=None, benchmarks={})]) is not None
    bare = dataclasses.replace(rows[0], benchmarks={})
    for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        bare = dataclasses.replace(bare, **{f"ifbench_{name}": None})
    assert benchmark_bars_png([bare]) is None  # an older run's row: no chart


# ------------------------------------------------------------------------------------ evaluation.benchmarks


TOY_TASK = """task: toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_benchmark_suite_runs_the_configured_lm_eval_tasks_into_a_typed_result(tmp_path):
    pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness (the dev extra has it)")
    questions = [("Two plus two is", ["four", "five"], 0), ("The sky is", ["green", "blue"], 1)] * 3
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in questions))
    (tmp_path / "toy_choice.yaml").write_text(TOY_TASK.format(data=data))
    settings = EvaluationConfig(
        ifbench=IFBenchConfig(enabled=False),
        benchmarks=[{"task": "toy_choice", "task_dir": str(tmp_path), "chat_template": False}],
        max_new_tokens=4,
        batch_size=2,
        dtype="float32",
    )
    context = EvalContext(generator="g", out_dir=tmp_path / "eval", run=ModelRun(dtype="float32", show_progress=False))
    ifbench, harness = evaluate_benchmarks("tiny", settings, context)

    assert ifbench is None and harness is not None
    assert harness.dtype == "float32" and harness.summary_file == str(
        tmp_path / "eval" / "benchmarks" / "benchmarks.json"
    )
    (score,) = harness.scores
    assert (score.task, score.metric, score.percent, score.n) == ("toy_choice", "acc,none", True, 6)
    # lm_eval's per-document scores, averaged here: accuracy and the standard error of a mean, in %
    samples = read_jsonl(tmp_path / "eval" / "benchmarks" / "lm_eval_samples.jsonl")
    correct = np.array([s["scores"]["acc"] for s in samples], dtype=float)
    assert len(correct) == 6 and score.value == pytest.approx(100 * correct.mean())
    assert score.stderr == pytest.approx(100 * correct.std(ddof=1) / np.sqrt(len(correct)))
