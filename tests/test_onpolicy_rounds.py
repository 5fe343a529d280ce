"""Two on-policy rounds of DPO end to end, offline, from the library: the tiny policy samples, the local judge
(judge_model tiny) scores, the pairs train DPO (steps.train.recipes.run_preference on the round's directory), and
round 1 samples from round 0's model. Run again, both rounds reuse every phase: nothing generated or judged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from steps.evaluate.generation import ModelRun
from steps.io import read_json, read_jsonl
from steps.onpolicy.config import OnPolicyConfig
from steps.onpolicy.rounds import prepare_round, round_dir

QUIET = ModelRun(show_progress=False)
ON_POLICY = OnPolicyConfig(
    enabled=True,
    rounds=2,
    samples_per_prompt=2,
    max_prompts=4,
    max_new_tokens=8,
    temperature=1.0,
    judge="local_logprob",
    judge_model="tiny",
)


def _train(policy: str, sft: str, data_dir: Path, out_dir: Path):
    from steps.config import config_from_dict
    from steps.train.recipes import run_preference

    cfg = config_from_dict(
        {
            "model": {"base": "tiny", "dtype": "float32"},
            "preference": {
                "criterion": "dpo",
                "init": policy,
                "reference": ON_POLICY.reference_for(policy, sft),
                "lr": 5e-3,
                "epochs": 2,
                "max_steps": 2,
                "max_seq_len": 128,
                "max_num_tokens": 512,
                "dev_every_epoch": False,
            },
        }
    )
    return run_preference(cfg, "dpo", data_dir, out_dir)


@pytest.mark.slow
def test_two_on_policy_rounds_of_dpo(tmp_path, monkeypatch):
    from steps.data import prepare_oasst
    from steps.evaluate import load_eval_set
    from steps.onpolicy import judging, sampling

    data_dir = Path(prepare_oasst("embedded", tmp_path / "data").output_dir)
    eval_instructions = load_eval_set("embedded").instructions
    rounds_root = tmp_path / "rounds"
    policy = sft = "tiny"
    policies, summaries = [], []
    for index in range(ON_POLICY.rounds):
        policies.append(policy)
        pairs = prepare_round(
            policy,
            ON_POLICY,
            index,
            rounds_root,
            data_dir,
            eval_instructions=eval_instructions,
            judge_options=ON_POLICY.judge_options({}),
            run=QUIET,
        )
        where = round_dir(rounds_root, index)
        assert pairs.stats["pairs_kept"] == len(read_jsonl(where / "preference.train.jsonl")) > 0
        assert (where / "preference.dev.jsonl").read_bytes() == (data_dir / "preference.dev.jsonl").read_bytes()
        summary = _train(policy, sft, where, tmp_path / f"train-{index}")
        assert summary.steps == 2 and summary.init == policy and summary.reference == policy
        assert math.isfinite(summary.final_train["loss"])
        summaries.append(summary)
        policy = summary.model_dir

    stats = [read_json(round_dir(rounds_root, i) / "round_stats.json") for i in range(2)]
    assert [s["policy"] for s in stats] == policies == ["tiny", summaries[0].model_dir]
    for s in stats:
        assert s["prompts"] == 4 and s["samples"] == 8 and s["judge"] == "local_logprob:tiny"
        pairs_judged = s["prompts"] - s["prompts_without_two_answers"]  # k = 2: one comparison per prompt
        assert s["judgements"] == s["distinct_answers"] - s["prompts"] == pairs_judged
        assert s["tokens"]["answers"] > 0 and s["tokens"]["judge_prompt"] > 0
    prompts = [{r["instruction"] for r in read_jsonl(round_dir(rounds_root, i) / "samples.jsonl")} for i in range(2)]
    assert not prompts[0] & prompts[1]  # each round its own window of prompts
    assert not (prompts[0] | prompts[1]) & set(eval_instructions)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished round did its work again")

    monkeypatch.setattr(sampling, "answer_instructions", refuse)
    monkeypatch.setattr(judging, "judge_answers", refuse)
    for index in range(ON_POLICY.rounds):
        again = prepare_round(
            policies[index],
            ON_POLICY,
            index,
            rounds_root,
            data_dir,
            eval_instructions=eval_instructions,
            judge_options=ON_POLICY.judge_options({}),
            run=QUIET,
        )
        assert again.rows == read_jsonl(round_dir(rounds_root, index) / "preference.train.jsonl")
