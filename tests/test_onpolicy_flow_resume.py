"""A real Metaflow run of 2 on-policy rounds of DPO whose round judge is a served one (a fake OpenAI-compatible
server on 127.0.0.1 over the tiny model, counting requests), SIGKILLed whole while round 2 is judging (round 1
finished), then ``resume``d: no pair is judged twice, and round 1 is cloned, not redone."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.test_onpolicy_flow import rounds_config
from tests.test_reliability_flow import JUDGE_KEY, KEY_ENV, Flow, JudgeServer, flow_env, run_of, when

ROUND_PROMPTS = 6  # samples_per_prompt 2: one comparison, one request, per prompt and round


def _judged(root: Path, number: int) -> int:
    files = list((root / "dpo" / "rounds" / f"round-{number:03d}" / "judge_cache").glob("*.jsonl"))
    return files[0].read_bytes().count(b"\n") if files else 0


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    from steps.models import load_model, load_tokenizer

    tmp = tmp_path_factory.mktemp("onpolicy_resume")
    server = JudgeServer(load_model("tiny", seed=5), load_tokenizer("tiny"), api_key=JUDGE_KEY, delay_s=0.5).start()
    config = tmp / "config.yaml"
    served = {"max_prompts": ROUND_PROMPTS, "judge": "openai_compatible", "judge_model": "served-tiny"}
    options = {"judge_base_url": server.url, "judge_api_key_env": KEY_ENV, "judge_concurrency": 1}
    config.write_text(rounds_config(tmp / "runs", served, options))  # the evaluation judge stays local
    env = flow_env(tmp / "mf", tmp / "reports")
    t0 = time.monotonic()
    try:
        flow = Flow(["--config", "config", str(config), "run", "--loss", "dpo"], env, tmp / "run.log")
        origin = flow.run_id()
        root = tmp / "runs" / "PrefFlow" / origin
        when(lambda: _judged(root, 2) >= 2, flow.kill_all, flow, timeout=600).join(timeout=600)
        assert flow.proc.returncode == -signal.SIGKILL, f"the run ended before the kill\n{flow.output()[-3000:]}"
        at_kill = {
            "judged": _judged(root, 2),
            "requests": server.user_texts(),
            "round1": {str(p): p.stat().st_mtime_ns for p in (root / "dpo" / "rounds" / "round-001").rglob("*")},
        }
        resumed = Flow(["resume", "--origin-run-id", origin], env, tmp / "resume.log")
        code = resumed.wait(timeout=600)
    finally:
        server.stop()
    print(f"on-policy run killed in round 2 and resumed: {time.monotonic() - t0:.0f}s")
    return {
        "tmp": tmp,
        "root": root,
        "origin": origin,
        "resumed": resumed,
        "code": code,
        "at_kill": at_kill,
        "requests": server.user_texts(),
    }


@pytest.mark.slow
def test_killed_round_resumes_without_judging_a_pair_twice(killed_and_resumed):
    from steps.io import read_json

    r = killed_and_resumed
    assert r["code"] == 0, r["resumed"].output()[-4000:]
    root, at_kill, requests = r["root"], r["at_kill"], r["requests"]
    assert at_kill["judged"] >= 2  # killed while round 2 was judging
    judging = [read_json(root / "dpo" / "rounds" / f"round-{n:03d}" / "judging.json") for n in (1, 2)]
    first, second = (j["judgements"] for j in judging)
    assert first > 0 and second > at_kill["judged"]
    # a comparison is one prompt text: a text sent twice is a pair judged twice. Only the request in flight at the
    # kill (sent, not yet cached) may go again.
    repeated = {text: n for text, n in Counter(requests).items() if n > 1}
    assert len(set(requests)) == first + second
    in_flight = at_kill["requests"][first + at_kill["judged"] :]  # sent in round 2, not cached at the kill
    assert len(in_flight) <= 1 and set(repeated) <= set(in_flight) and all(n == 2 for n in repeated.values())
    # the resumed round 2 took what the killed one had judged from the cache and asked only for the rest
    assert judging[1]["judgements_cached"] == at_kill["judged"]
    assert judging[1]["judgements_new"] == judging[1]["judge_requests"] == second - at_kill["judged"]
    assert len(requests) - len(at_kill["requests"]) == second - at_kill["judged"]


@pytest.mark.slow
def test_resume_clones_round_one_and_redoes_round_two(killed_and_resumed):
    r = killed_and_resumed
    assert r["code"] == 0, r["resumed"].output()[-4000:]
    run = run_of(r["tmp"] / "mf", r["resumed"].run_id())
    assert run.successful
    by_round = {len(t.data.round_outcomes): t for t in run["onpolicy_round"].tasks()}
    assert sorted(by_round) == [1, 2]
    assert by_round[1].origin_pathspec is not None  # round 1: cloned from the killed run
    assert by_round[1].origin_pathspec.startswith(f"PrefFlow/{r['origin']}/onpolicy_round/")
    assert by_round[2].origin_pathspec is None  # round 2: run again
    round1 = r["root"] / "dpo" / "rounds" / "round-001"
    after = {str(p): p.stat().st_mtime_ns for p in round1.rglob("*")}
    assert after == r["at_kill"]["round1"]  # nothing of round 1 written again
    results = {x.variant: x for x in run["join"].task.data.results}
    assert list(results) == ["sft", "dpo-round-1", "dpo-round-2"]
    assert results["dpo-round-2"].evaluation.init == "round 1"
    outcomes = by_round[2].data.round_outcomes
    assert outcomes[1].train.init == outcomes[0].train.model_dir == str(round1 / "train" / "final")
    assert outcomes[1].stats["judge"].startswith("openai_compatible")
