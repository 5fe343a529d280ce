"""An on-policy round judged by a served judge (tests/served_judge_server.py: a real HTTP chat-completions server
over the tiny model) and interrupted, by SIGKILL or by the request budget, then resumed: the server counts the
requests, and no comparison judged before the interruption is sent again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steps.evaluate.annotate import AnnotationCache
from steps.evaluate.generation import ModelRun
from steps.evaluate.judges import JudgeError
from steps.onpolicy.config import OnPolicyConfig
from steps.onpolicy.judging import group_answers, judge_round
from steps.onpolicy.pairwise import comparisons
from steps.onpolicy.prompts import RoundPrompt
from steps.onpolicy.sampling import read_samples, sample_round
from tests.served_judge_server import ChatCompletionsServer

REPO_ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "PREFFLOW_ONPOLICY_JUDGE_KEY"
KEY = "sk-prefflow-onpolicy-31d4c9e2"
CFG = OnPolicyConfig(
    enabled=True,
    samples_per_prompt=4,
    max_new_tokens=6,
    temperature=1.0,
    seed=5,
    judge="openai_compatible",
    judge_model="served-tiny",
)
PROMPTS = [RoundPrompt(f"q{i}", f"Question {i}: name something that is {c}.") for i, c in enumerate(["red", "cold"])]


@pytest.fixture(scope="module")
def tiny_server_model():
    from steps.models import load_model, load_tokenizer

    return load_model("tiny", seed=5), load_tokenizer("tiny")


@pytest.fixture()
def server(tiny_server_model, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    started = ChatCompletionsServer(*tiny_server_model, api_key=KEY).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("served") / "round-000"
    sample_round("tiny", PROMPTS, CFG, 0, where, ModelRun(show_progress=False))
    return where


def _fresh_round(sampled: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("samples.jsonl", "samples.json"):
        (target / name).write_bytes((sampled / name).read_bytes())
    return target


def _options(url: str, **extra) -> dict:
    evaluation = {"judge_base_url": url, "judge_api_key_env": KEY_ENV, "judge_concurrency": 1, **extra}
    return CFG.judge_options(evaluation)


def _shown(round_dir: Path) -> list[tuple[str, str, str]]:
    """(instruction, output_1, output_2) of every comparison the round makes."""
    return [
        (group.instruction, group.texts[a], group.texts[b])
        for group in group_answers(read_samples(round_dir))
        for a, b in comparisons(len(group.texts))
    ]


def _requests_per_comparison(server, shown) -> list[int]:
    """How many requests the server received for each comparison (every request belongs to exactly one)."""
    users = server.user_texts()
    owners = [[i for i, (q, a, b) in enumerate(shown) if q in u and a in u and b in u] for u in users]
    assert all(len(owner) == 1 for owner in owners), "a request matches no comparison or several"
    return [sum(owner == [i] for owner in owners) for i in range(len(shown))]


def _cached(round_dir: Path, server_url: str, shown) -> list[bool]:
    from steps.evaluate.judges import make_judge

    identity = make_judge(CFG.judge, **_options(server_url)).cache_identity
    cache = AnnotationCache(round_dir / "judge_cache", identity)
    return [cache.get(cache.key(*row)) is not None for row in shown]


def test_killed_round_resumes_without_judging_a_pair_twice(server, sampled, tmp_path):
    round_dir = _fresh_round(sampled, tmp_path / "round-000")
    shown = _shown(round_dir)
    assert len(shown) >= 8  # 2 prompts x up to 6 comparisons of 4 distinct answers
    script = (
        "import sys\n"
        "from steps.evaluate.generation import ModelRun\n"
        "from steps.onpolicy.judging import judge_round\n"
        "from tests.test_onpolicy_served import CFG, _options\n"
        "judge_round(sys.argv[1], CFG, judge_options=_options(sys.argv[2]), run=ModelRun(show_progress=False))\n"
    )
    env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(REPO_ROOT)}
    server.delay_s = 0.4
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(round_dir), server.url],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        files = list((round_dir / "judge_cache").glob("*.jsonl"))
        if files and files[0].read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (round_dir / "judging.json").exists()

    judged = _cached(round_dir, server.url, shown)
    assert 3 <= sum(judged) < len(shown)
    before = _requests_per_comparison(server, shown)
    assert all(count == 1 for count, done in zip(before, judged) if done)

    server.delay_s = 0.0
    resumed = judge_round(round_dir, CFG, judge_options=_options(server.url), run=ModelRun(show_progress=False))
    after = _requests_per_comparison(server, shown)
    assert [a for a, done in zip(after, judged) if done] == [b for b, done in zip(before, judged) if done]
    assert all(count >= 1 for count in after)
    assert len(server.requests) <= len(shown) + 1  # at most the request in flight at the kill is sent again
    assert resumed.meta["judgements"] == len(shown) and resumed.meta["judgements_cached"] == sum(judged)
    assert resumed.meta["judgements_new"] == resumed.meta["judge_requests"] == len(shown) - sum(judged)
    assert resumed.meta["judge_prompt_tokens"] > 0 and resumed.meta["judge_completion_tokens"] == len(shown)

    # done rounds are reused; without their record every judgement comes from the cache: no request either way
    sent = len(server.requests)
    assert judge_round(round_dir, CFG, judge_options=_options(server.url), run=ModelRun(show_progress=False)).reused
    (round_dir / "judging.json").unlink()
    again = judge_round(round_dir, CFG, judge_options=_options(server.url), run=ModelRun(show_progress=False))
    assert len(server.requests) == sent and again.meta["judgements_new"] == 0 and again.scores == resumed.scores

    written = [p.read_bytes() for p in round_dir.rglob("*") if p.is_file()]
    assert written and all(KEY.encode() not in blob for blob in [*written, out, err])


def test_round_stopped_by_the_request_budget_resumes_with_the_rest(server, sampled, tmp_path):
    round_dir = _fresh_round(sampled, tmp_path / "round-000")
    shown = _shown(round_dir)
    with pytest.raises(JudgeError, match="request budget exhausted after 3 requests"):
        judge_round(round_dir, CFG, judge_options=_options(server.url, judge_max_requests=3))
    assert len(server.requests) == 3 and sum(_cached(round_dir, server.url, shown)) == 3
    resumed = judge_round(round_dir, CFG, judge_options=_options(server.url, judge_max_requests=len(shown)))
    assert _requests_per_comparison(server, shown) == [1] * len(shown)
    assert (resumed.meta["judgements_cached"], resumed.meta["judgements_new"]) == (3, len(shown) - 3)
