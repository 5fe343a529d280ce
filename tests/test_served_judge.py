"""The ``openai_compatible`` judge against a real local HTTP server (tests/served_judge_server.py) that serves a
real model's next-token top_logprobs: the official prompt, swap and parse; retries on 429/500/hangs; the request
budget; a SIGKILLed judging process that, restarted, never sends an already-judged pair again; the key on no disk."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steps.evaluate.annotate import AnnotationCache, annotate, pair_outputs
from steps.evaluate.judges import JudgeError, LocalLogprobJudge, make_judge
from tests.served_judge_server import ChatCompletionsServer

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "PREFFLOW_TEST_JUDGE_KEY"
KEY = "sk-prefflow-test-9f8e7d6c5b4a"


def _outputs(n, prefix="Question"):
    instructions = [
        f"{prefix} {i}: name one thing that is {c}."
        for i, c in zip(range(n), ["red", "blue", "green", "soft", "loud", "cold", "round", "sweet", "tall"] * 9)
    ]
    model = [
        {"instruction": q, "output": f"A {['rose', 'sky', 'leaf', 'cat'][i % 4]}.", "generator": "policy"}
        for i, q in enumerate(instructions)
    ]
    ref = [
        {"instruction": q, "output": f"Something {i} that fits.", "generator": "reference"}
        for i, q in enumerate(instructions)
    ]
    return instructions, model, ref


@pytest.fixture(scope="module")
def tiny_server_model():
    from steps.models import load_model, load_tokenizer

    return load_model("tiny", seed=5), load_tokenizer("tiny")


@pytest.fixture()
def server(tiny_server_model, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    started = ChatCompletionsServer(*tiny_server_model, api_key=KEY, hang_s=1.5).start()
    yield started
    started.stop()


def _judge(server, **options):
    settings = {
        "judge_model": "served-tiny",
        "judge_base_url": server.url,
        "judge_api_key_env": KEY_ENV,
        "judge_concurrency": 1,
        "show_progress": False,
    }
    settings.update(options)
    judge = make_judge("openai_compatible", **settings)
    judge.backoff_s = 0.01
    return judge


def _expected_preference(raw, switched):
    """alpaca_eval's own parser on the reply's top log-probs, flipped where the outputs were swapped."""
    from alpaca_eval.completion_parsers import logprob_parser

    completion = {
        "logprobs": {"content": [{"token": raw["top_logprobs"][0]["token"], "top_logprobs": raw["top_logprobs"]}]}
    }
    presented = logprob_parser(completion, numerator_token="m", denominator_tokens=["m", "M"], is_binarize=False)[0]
    return 3 - presented if switched else presented


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_request_is_the_official_one(server):
    from alpaca_eval.utils import random_seeded_choice

    instructions, model, ref = _outputs(3)
    rows = annotate(model, ref, _judge(server))
    assert len(server.requests) == 3
    for row, request, instruction in zip(rows, server.requests, instructions):
        body = request["body"]
        assert {k: body[k] for k in ("model", "max_tokens", "temperature", "logprobs", "top_logprobs")} == {
            "model": "served-tiny",
            "max_tokens": 1,
            "temperature": 1,
            "logprobs": True,
            "top_logprobs": 5,
        }
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        switched = random_seeded_choice(seed="is_switched_outputs" + instruction + "0", choices=[False, True])
        user = body["messages"][1]["content"]
        first, second = (row["output_2"], row["output_1"]) if switched else (row["output_1"], row["output_2"])
        assert user.index(first) < user.index(second) and instruction in user
        assert row["raw_completion"]["is_switched_outputs"] is switched
        assert _same(row["preference"], _expected_preference(row["raw_completion"], switched))
        assert row["raw_completion"]["usage"]["completion_tokens"] == 1
        assert request["authorization"] == f"Bearer {KEY}"
        assert row["annotator"] == "openai_compatible:served-tiny"


def test_retries_on_429_500_and_hang(server):
    server.faults = ["429", "500", "hang"]
    instructions, model, ref = _outputs(3)
    judge = _judge(server, judge_timeout_s=0.5)
    rows = annotate(model, ref, judge)
    assert len(server.requests) == 6 and judge.requests_made == 6 and judge.retries == 3
    assert [server.count(q) for q in instructions] == [4, 1, 1]
    assert all(r["raw_completion"] is not None for r in rows)


def test_gives_up_after_max_retries(server):
    server.faults = ["500"] * 10
    _, model, ref = _outputs(1)
    judge = _judge(server)
    judge.max_retries = 2
    with pytest.raises(JudgeError, match="failed 3 times; last: HTTP 500"):
        annotate(model, ref, judge)
    assert len(server.requests) == 3


def test_request_budget_and_cache(server, tmp_path):
    instructions, model, ref = _outputs(3)
    with pytest.raises(JudgeError, match="request budget exhausted after 2 requests"):
        annotate(model, ref, _judge(server, judge_max_requests=2), cache_dir=tmp_path)
    assert len(server.requests) == 2
    rows = annotate(model, ref, _judge(server, judge_max_requests=5), cache_dir=tmp_path)
    assert len(server.requests) == 3 and [server.count(q) for q in instructions] == [1, 1, 1]
    assert len(rows) == 3


def test_wrong_key_fails_at_once_without_the_key(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-123")
    _, model, ref = _outputs(1)
    with pytest.raises(JudgeError, match=f"HTTP 401 \\(is \\${KEY_ENV} the right key\\?\\)") as info:
        annotate(model, ref, _judge(server))
    assert "sk-wrong-key-123" not in str(info.value) and len(server.requests) == 1
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=f"\\${KEY_ENV}, which is not set"):
        _judge(server).check()


def test_server_without_logprobs_is_an_error(server):
    server.faults = ["nologprobs"]
    _, model, ref = _outputs(1)
    with pytest.raises(JudgeError, match="returned no top_logprobs"):
        annotate(model, ref, _judge(server))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"judge_model": "embedded:smollm2-135m-instruct"}, "needs the name the server serves"),
        ({"judge_base_url": None}, "needs evaluation.judge_base_url"),
        ({"judge_max_requests": 0}, "judge_max_requests must be an integer >= 1"),
        ({"judge_timeout_s": 0}, "judge_timeout_s must be a number > 0"),
    ],
)
def test_bad_settings(options, message):
    settings = {"judge_model": "m", "judge_base_url": "http://localhost:1/v1", **options}
    with pytest.raises(JudgeError, match=message):
        make_judge("openai_compatible", **settings)


def test_served_embedded_model_agrees_with_the_local_judge(shared_dir, tokenizer):
    """The embedded SmolLM2 behind the server and the local log-prob judge on the same model see the same prompt:
    the served "M" log-prob is the local one, and where both identifiers are in the top 5, so is the preference
    (official vicuna rows, cut to 300 characters; "m" is in the top 5 of row 3)."""
    from steps.models import DEFAULT_MODEL, load_model

    with open(shared_dir / "alpaca_eval" / "annotations" / "vicuna-7b-v1.5.json", encoding="utf-8") as fh:
        official = json.load(fh)[:4]
    model_outputs = [{"instruction": r["instruction"], "output": r["output_2"][:300]} for r in official]
    ref = [{"instruction": r["instruction"], "output": r["output_1"][:300]} for r in official]
    model = load_model(DEFAULT_MODEL)
    server = ChatCompletionsServer(model, tokenizer).start()
    try:
        served = annotate(
            model_outputs, ref, make_judge("openai_compatible:smollm2", judge_base_url=server.url, show_progress=False)
        )
    finally:
        server.stop()
    local = annotate(
        model_outputs,
        ref,
        LocalLogprobJudge(DEFAULT_MODEL, model=model, tokenizer=tokenizer, judge_max_chars=10_000, show_progress=False),
    )
    both = 0
    for s, loc in zip(served, local):
        top = {t["token"]: t["logprob"] for t in s["raw_completion"]["top_logprobs"]}
        assert s["raw_completion"]["is_switched_outputs"] == loc["raw_completion"]["is_switched_outputs"]
        assert s["raw_completion"]["usage"]["prompt_tokens"] == loc["raw_completion"]["prompt_tokens"]
        assert top["M"] == pytest.approx(loc["raw_completion"]["identifier_logprobs"]["M"], abs=1e-3)
        assert _same(
            s["preference"], _expected_preference(s["raw_completion"], s["raw_completion"]["is_switched_outputs"])
        )
        if {"m", "M"} <= set(top):
            both += 1
            assert s["preference"] == pytest.approx(loc["preference"], abs=1e-4)
    assert both >= 1


def _annotate_command(server_url, tmp_path, n):
    _, model, ref = _outputs(n, prefix="Item")
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    return [
        sys.executable,
        "-m",
        "steps.evaluate",
        "annotate",
        "--model-outputs",
        str(tmp_path / "model.json"),
        "--reference-outputs",
        str(tmp_path / "ref.json"),
        "--output",
        str(tmp_path / "annotations.json"),
        "--judge",
        "openai_compatible",
        "--judge-model",
        "served-tiny",
        "--judge-base-url",
        server_url,
        "--judge-api-key-env",
        KEY_ENV,
        "--judge-concurrency",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]


def test_killed_judging_never_resends_a_judged_pair(server, tmp_path):
    n = 8
    instructions, model, ref = _outputs(n, prefix="Item")
    command = _annotate_command(server.url, tmp_path, n)
    env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(REPO_ROOT)}
    server.delay_s = 0.4
    cache_dir = tmp_path / "cache"
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        files = list(cache_dir.glob("*.jsonl"))
        if files and files[0].read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    out1, err1 = first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL

    identity = make_judge("openai_compatible", judge_model="served-tiny", judge_base_url=server.url).cache_identity
    cache = AnnotationCache(cache_dir, identity)
    judged = [
        row["instruction"]
        for row in pair_outputs(model, ref)
        if cache.get(cache.key(row["instruction"], row["output_1"], row["output_2"])) is not None
    ]
    assert 3 <= len(judged) < n
    before = {q: server.count(q) for q in instructions}

    server.delay_s = 0.0
    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, timeout=300)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    after = {q: server.count(q) for q in instructions}
    assert {q: after[q] for q in judged} == {q: before[q] for q in judged}  # not one judged pair sent again
    assert all(after[q] >= 1 for q in instructions)
    assert len(server.requests) <= n + 1  # at most the one request in flight at the kill is sent twice
    annotations = json.loads((tmp_path / "annotations.json").read_text())
    assert [a["instruction"] for a in annotations] == instructions
    assert all(a["raw_completion"] is not None for a in annotations)

    # the key reached the server and nothing else: no file, no output
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(KEY.encode() not in blob for blob in written + [out1, err1, second.stdout, second.stderr])
    assert json.loads(second.stdout.decode().strip().splitlines()[-1])["judge_api_key_env"] == KEY_ENV


def test_evaluate_model_with_a_served_judge_counts_tokens_and_cost(server, tiny_server_model, tmp_path):
    """A priced model name behind the local server: cost from the server's usage, checked against the prompt
    lengths recomputed from the requests the server received."""
    from steps.config import EvaluationConfig
    from steps.evaluate import EvalContext, ModelRun, evaluate_model, load_eval_set

    _, tokenizer = tiny_server_model
    eval_set = load_eval_set("embedded", max_instructions=3)
    refs = [
        {"instruction": q, "output": f"Reference answer {i}.", "generator": "ref"}
        for i, q in enumerate(eval_set.instructions)
    ]
    settings = EvaluationConfig(
        max_new_tokens=3,
        batch_size=3,
        judge="openai_compatible",
        judge_model="gpt-4o-mini-2024-07-18",
        judge_base_url=server.url,
        judge_api_key_env=KEY_ENV,
        judge_concurrency=2,
        agreement_registry=str(tmp_path / "none.json"),
    )
    context = EvalContext(generator="tiny", out_dir=tmp_path / "eval", run=ModelRun(show_progress=False))
    result = evaluate_model("tiny", eval_set, refs, settings, context).metrics_json()
    prompts = [
        len(
            tokenizer(
                tokenizer.apply_chat_template(r["body"]["messages"], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
        )
        for r in server.requests
    ]
    assert len(prompts) == 3 and result["judge_tokens"]["prompt"] == sum(prompts)
    assert result["judge_tokens"]["completion"] == 3
    assert result["judge_cost_usd"] == pytest.approx((sum(prompts) * 0.15 + 3 * 0.6) / 1e6)
    assert result["judge"] == "openai_compatible:gpt-4o-mini-2024-07-18" and result["judge_requests_made"] == 3
    assert result["judge_api_key_env"] == KEY_ENV and KEY not in json.dumps(result)
