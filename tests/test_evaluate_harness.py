"""lm-evaluation-harness on PrefFlow models, offline: tasks defined in YAML files written here (a multiple-choice
log-likelihood task, a group of two, and a generate_until task with exact_match) over JSONL data, run on the tiny
random Llama with the real SmolLM2 tokenizer. Every score is checked against plain transformers forward passes
and ``generate`` calls, and every standard error against its formula."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steps.chat import render_prompt, stop_token_ids
from steps.evaluate.benchmark_specs import BenchmarkSpec
from steps.evaluate.generation import ModelRun
from steps.evaluate.harness import (
    RESULTS_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    BenchmarkError,
    check_nltk_data,
    fetch_benchmarks,
    load_benchmark,
    main,
    run_benchmarks,
    task_manager,
)
from steps.evaluate.settings import GenerationSettings
from steps.io import read_json, read_jsonl

# steps.evaluate.harness imports lm_eval only when it runs
pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install -e '.[benchmarks]' (dev has it)")

QUESTIONS = [
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Two plus two equals", ["four", "five"], 0),
    ("The colour of a clear sky is", ["green", "blue", "red", "black"], 1),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit"], 0),
    ("The largest planet is", ["Mars", "Jupiter", "Venus"], 1),
    ("A week has seven", ["days", "hours", "years"], 0),
    ("Cats like to chase", ["mice", "clouds"], 0),
    ("The opposite of hot is", ["warm", "cold", "loud"], 1),
    ("Bees make", ["honey", "milk", "silk", "glass"], 0),
    ("The sun rises in the", ["west", "east"], 1),
    ("Ice is frozen", ["water", "sand", "air"], 0),
    ("A triangle has three", ["sides", "wheels"], 0),
]
PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "Tell a joke."]
#: The tiny Llama with its own output layer: with tied embeddings a random model just repeats its last input token
#: (the chat prompt's newline), which would make every greedy answer the same.
TINY = 'tiny:{"tie_word_embeddings": false}'
GEN_TOKENS = 6
GREEDY = GenerationSettings(max_new_tokens=GEN_TOKENS, temperature=0.0, batch_size=1)
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
MC_YAML = """output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""
GEN_YAML = """output_type: generate_until
doc_to_text: question
doc_to_target: target
generation_kwargs:
  until: ["\\n\\n"]
  do_sample: false
  max_gen_toks: 32
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""
GROUP_YAML = """group: toy_group
task: [toy_mc, toy_mc_b]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 3.0
"""


def write_task(directory: Path, name: str, rows: list[dict], body: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data) + body)


@pytest.fixture(scope="module")
def tiny():
    from steps.models import load_model, load_tokenizer

    return load_model(TINY), load_tokenizer(TINY)


def choice_logprobs(model, tok, context: str, choices: list[str], delimiter: str = " ") -> list[float]:
    """Sum of log P(delimiter + choice tokens | context tokens) per choice, by one plain forward pass each (lm_eval
    puts the task's target_delimiter, a space by default, between question and answer)."""
    ctx = tok(context, add_special_tokens=False).input_ids
    out = []
    for choice in (delimiter + c for c in choices):
        cont = tok(choice, add_special_tokens=False).input_ids
        assert tok(context + choice, add_special_tokens=False).input_ids == ctx + cont  # no merge at the boundary
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
        out.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
    return out


def greedy_answer(model, tok, prompt: str, until: list[str]) -> str:
    """The chat-rendered prompt answered greedily by ``generate`` (PrefFlow's stop tokens), cut at ``until``."""
    ids = tok(render_prompt(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=GEN_TOKENS,
            do_sample=False,
            eos_token_id=stop_token_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
    text = tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


@pytest.fixture(scope="module")
def expected(tiny):
    """Everything the harness should report, computed here without lm_eval."""
    model, tok = tiny
    correct = []
    for question, choices, answer in QUESTIONS:
        scores = choice_logprobs(model, tok, question, choices)
        correct.append(float(max(range(len(choices)), key=scores.__getitem__) == answer))
    answers = [greedy_answer(model, tok, p, ["\n\n"]) for p in PROMPTS]
    return {"correct": correct, "answers": answers}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, expected) -> Path:
    """The local tasks; the generation targets are the model's own answers for even rows, never for odd ones."""
    directory = tmp_path_factory.mktemp("tasks")
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    write_task(directory, "toy_mc", mc, MC_YAML.format(version=1.0))
    write_task(directory, "toy_mc_b", mc[::-1], MC_YAML.format(version=1.5))
    answers = expected["answers"]
    assert all(answers) and len(set(answers)) > 1, f"degenerate answers make a weak check: {answers}"
    gen = [
        {"question": p, "target": a if i % 2 == 0 else a + " (not it)"}
        for i, (p, a) in enumerate(zip(PROMPTS, answers))
    ]
    write_task(directory, "toy_gen", gen, GEN_YAML)
    (directory / "toy_group.yaml").write_text(GROUP_YAML)
    return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory, task_dir):
    out = tmp_path_factory.mktemp("eval")
    specs = [
        BenchmarkSpec("toy_mc", chat_template=False, task_dir=str(task_dir)),
        BenchmarkSpec("toy_gen", task_dir=str(task_dir)),
        BenchmarkSpec("toy_group", chat_template=False, limit=5, task_dir=str(task_dir)),
    ]
    summary = run_benchmarks(TINY, specs, GREEDY, out, ModelRun(device="auto", dtype="auto"))
    return summary, out


def test_multiple_choice_accuracy_and_stderr_match_plain_forward_passes(run, expected):
    summary, _ = run
    entry = summary["benchmarks"]["toy_mc"]
    correct = expected["correct"]
    n, p = len(correct), sum(correct) / len(correct)
    assert 0 < p < 1, "the check needs both right and wrong answers"
    assert entry["metric"] == "acc,none" and entry["value"] == pytest.approx(p, abs=1e-12)
    # lm_eval's mean_stderr: sample standard deviation (n - 1) over sqrt(n) = sqrt(p (1 - p) / (n - 1))
    assert entry["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-9)
    assert (entry["n"], entry["n_total"], entry["num_fewshot"], entry["limit"], entry["version"]) == (
        n,
        n,
        0,
        None,
        1.0,
    )


def test_each_choice_log_likelihood_in_the_samples_file_matches(run, tiny):
    _, out = run
    model, tok = tiny
    rows = [r for r in read_jsonl(out / SAMPLES_FILE) if r["benchmark"] == "toy_mc"]
    assert [r["doc_id"] for r in rows] == list(range(len(QUESTIONS)))
    for row, (question, choices, answer) in zip(rows, QUESTIONS):
        ours = choice_logprobs(model, tok, question, choices)
        assert [ll for ll, _ in row["response"]] == pytest.approx(ours, abs=2e-4)
        assert row["target"] == answer


def test_generation_uses_the_chat_prompt_and_greedy_answers_of_alpacaeval(run, expected):
    summary, out = run
    entry = summary["benchmarks"]["toy_gen"]
    assert entry["metric"] == "exact_match,none"
    assert entry["value"] == pytest.approx(0.5)  # the even rows' targets are exactly the model's greedy answers
    assert entry["stderr"] == pytest.approx(math.sqrt(0.25 / (len(PROMPTS) - 1)))
    rows = [r for r in read_jsonl(out / SAMPLES_FILE) if r["benchmark"] == "toy_gen"]
    assert [r["response"] for r in rows] == [[answer] for answer in expected["answers"]]  # lm_eval's shape
    used = entry["generation_kwargs"]["toy_gen"]
    assert used == {"until": ["\n\n", "<|im_end|>"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 6}


def test_a_group_pools_its_subtasks_as_lm_eval_defines(run, expected):
    summary, _ = run
    entry = summary["benchmarks"]["toy_group"]
    first = expected["correct"][:5]  # limit 5: the first five documents of each subtask
    reversed_first = expected["correct"][::-1][:5]
    pooled = first + reversed_first
    assert entry["value"] == pytest.approx(sum(pooled) / len(pooled), abs=1e-12)

    def sample_var(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)

    # lm_eval's pooled_sample_stderr: within-subtask pooled variance sum((n_i - 1) s_i^2) / (N - k), over N
    pooled_var = (4 * sample_var(first) + 4 * sample_var(reversed_first)) / (10 - 2)
    assert entry["stderr"] == pytest.approx(math.sqrt(pooled_var / 10), rel=1e-9)
    assert (entry["n"], entry["n_total"], entry["limit"]) == (10, 2 * len(QUESTIONS), 5)
    assert entry["leaf_versions"] == {"toy_mc": 1.0, "toy_mc_b": 1.5} and entry["version"] == "3.0"


def test_files_hold_raw_results_and_the_provenance_of_each_number(run):
    summary, out = run
    assert read_json(out / SUMMARY_FILE) == json.loads(json.dumps(summary))
    raw = read_json(out / RESULTS_FILE)
    assert set(raw) == {"toy_mc", "toy_gen", "toy_group"}
    assert raw["toy_mc"]["results"]["toy_mc"]["acc,none"] == summary["benchmarks"]["toy_mc"]["value"]
    assert raw["toy_mc"]["lm_eval_version"] == summary["lm_eval_version"] and "samples" not in raw["toy_mc"]
    assert (summary["device"], summary["dtype"], summary["backend"]) == ("cpu", "float32", "hf")
    assert summary["generation"]["temperature"] == 0.0 and summary["seeds"]["torch_random_seed"] == GREEDY.seed
    assert len(summary["chat_template_sha256"]) == 64
    assert len({summary["benchmarks"][t]["samples_sha256"] for t in ("toy_mc", "toy_gen", "toy_group")}) == 3
    assert not list(out.glob("*.tmp*"))


def test_sampling_follows_the_seed(task_dir, tmp_path, tiny):
    spec = [BenchmarkSpec("toy_gen", limit=2, task_dir=str(task_dir))]
    sampled = GenerationSettings(max_new_tokens=GEN_TOKENS, temperature=1.0, top_p=0.9, batch_size=1, seed=7)
    loaded = ModelRun(model=tiny[0], tokenizer=tiny[1])  # an already loaded model is used as it is

    def answers(settings, name):
        summary = run_benchmarks(TINY, spec, settings, tmp_path / name, loaded)
        assert summary["benchmarks"]["toy_gen"]["generation_kwargs"]["toy_gen"]["top_p"] == 0.9
        return [r["response"] for r in read_jsonl(tmp_path / name / SAMPLES_FILE)]

    first, again = answers(sampled, "a"), answers(sampled, "b")
    assert first == again
    assert answers(replace(sampled, seed=8), "c") != first


def test_missing_data_offline_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: prefflow-test/never-cached\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: q\ndoc_to_choice: c\ndoc_to_target: a\n"
    )
    spec = BenchmarkSpec("hub_task", task_dir=str(tmp_path))
    with pytest.raises(BenchmarkError) as caught:  # a model that cannot load: the data check comes first
        run_benchmarks("/nonexistent/model", [spec], GREEDY, tmp_path / "out")
    message = str(caught.value)
    assert "'hub_task'" in message and "HF_HUB_OFFLINE" in message
    assert "python -m steps.evaluate.harness fetch hub_task" in message
    assert not (tmp_path / "out").exists()


def test_unknown_names_and_missing_directories_are_named(task_dir):
    manager = task_manager([BenchmarkSpec("toy_mc", task_dir=str(task_dir))])
    with pytest.raises(BenchmarkError, match=r"'toy_mcc'.*did you mean 'toy_mc'"):
        load_benchmark(manager, BenchmarkSpec("toy_mcc", task_dir=str(task_dir)))
    with pytest.raises(BenchmarkError, match="task_dir '/nonexistent/tasks' is not a directory"):
        task_manager([BenchmarkSpec("toy_mc", task_dir="/nonexistent/tasks")])


def test_ifeval_needs_nltk_punkt_tab_before_anything_runs(tmp_path, monkeypatch):
    nltk = pytest.importorskip("nltk")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(BenchmarkError, match=r"python -m nltk.downloader punkt_tab"):
        check_nltk_data(BenchmarkSpec("ifeval"), ["ifeval"])
    with pytest.raises(BenchmarkError, match=r"'leaderboard'.*punkt_tab"):
        check_nltk_data(BenchmarkSpec("leaderboard"), ["leaderboard_bbh_navigate", "leaderboard_ifeval"])
    (tmp_path / "tokenizers" / "punkt_tab").mkdir(parents=True)
    check_nltk_data(BenchmarkSpec("ifeval"), ["ifeval"])
    check_nltk_data(BenchmarkSpec("toy_mc"), ["toy_mc"])  # other tasks need none


def test_fetch_loads_the_data_while_online_and_refuses_offline(task_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", "toy_mc"]) == 2
    assert "fetch needs the Hub: unset HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")  # the local JSON data needs no network either way
    assert fetch_benchmarks([{"task": "toy_mc", "task_dir": str(task_dir)}]) == ["toy_mc"]


def test_cli_runs_a_limited_smoke_benchmark(task_dir, tmp_path, capsys, expected):
    args = ["run", TINY, "--benchmarks", "toy_mc", "--task-dir", str(task_dir), "--limit", "4"]
    code = main([*args, "--no-chat-template", "--out", str(tmp_path), "--temperature", "0"])
    assert code == 0
    p = sum(expected["correct"][:4]) / 4
    cell = f"{100 * p:.1f} ± {100 * math.sqrt(p * (1 - p) / 3):.1f}"
    assert json.loads(capsys.readouterr().out) == {"toy_mc": cell}
    assert read_json(tmp_path / SUMMARY_FILE)["benchmarks"]["toy_mc"]["n"] == 4


def test_the_default_model_through_its_chat_template_scores_as_plain_forward_passes(task_dir, tmp_path):
    """SmolLM2-135M-Instruct, prompts in its chat template. lm_eval moves the prompt's trailing newline (the end of
    the assistant header) into every choice, so its log-likelihoods exceed ours by log P(newline | header): the
    same constant for all choices of a question, and the accuracy is the same. Four questions: on 2 busy cores a
    135M forward pass takes seconds."""
    from steps.models import DEFAULT_MODEL, load_model, load_tokenizer

    model, tok = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    spec = BenchmarkSpec("toy_mc", limit=4, task_dir=str(task_dir))
    summary = run_benchmarks(DEFAULT_MODEL, [spec], GREEDY, tmp_path, ModelRun(model=model, tokenizer=tok))
    rows = read_jsonl(tmp_path / SAMPLES_FILE)
    correct = []
    assert len(rows) == 4
    for row, (question, choices, answer) in zip(rows, QUESTIONS):
        prompt = render_prompt(tok, [{"role": "user", "content": question}])
        ours = choice_logprobs(model, tok, prompt, choices, delimiter="")
        offsets = [ll - mine for (ll, _), mine in zip(row["response"], ours)]
        assert max(offsets) - min(offsets) < 2e-3 and max(offsets) < 0
        correct.append(float(max(range(len(choices)), key=ours.__getitem__) == answer))
    assert summary["benchmarks"]["toy_mc"]["value"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
