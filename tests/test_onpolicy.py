"""On-policy rounds (steps.onpolicy): the config section, prompt selection, sampling from the tiny policy (seeds,
reuse), scoring with a reward model and with the local pairwise judge, and pair building against hand-computed
expectations, with the rows read by the trainer's tokenize_pairs."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from steps.config.convert import ConfigError, build
from steps.evaluate.generation import ModelRun
from steps.io import read_json, read_jsonl, write_jsonl
from steps.onpolicy.config import OnPolicyConfig
from steps.onpolicy.pairs import ChosenPair, select_pairs
from steps.onpolicy.pairwise import comparisons, mean_win_scores
from steps.onpolicy.prompts import (
    OnPolicyError,
    PromptSource,
    RoundPrompt,
    drop_eval_prompts,
    read_prompts,
    round_prompts,
)

QUIET = ModelRun(show_progress=False)
PROMPTS = [
    RoundPrompt("p-colour", "Name a colour."),
    RoundPrompt("p-fruit", "Name a fruit that is yellow."),
    RoundPrompt("p-count", "Count from one to three."),
]


def small(**changes) -> OnPolicyConfig:
    settings = {"samples_per_prompt": 3, "max_new_tokens": 6, "temperature": 1.0, "batch_size": 4, "seed": 11}
    return OnPolicyConfig(**{"enabled": True, **settings, **changes})


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "section, key, message",
    [
        ({"rounds": 0}, "rounds", "must be >= 1"),
        ({"samples_per_prompt": 1}, "samples_per_prompt", "a pair needs two answers"),
        ({"prompts": "eval"}, "prompts", "never train on evaluation"),
        ({"prompts": "dev"}, "prompts", "never train on evaluation"),
        ({"prompts": "prompts.txt"}, "prompts", "a path to a .jsonl file"),
        ({"temperature": 0}, "temperature", "greedy decoding"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"min_margin": -0.1}, "min_margin", ">= 0"),
        ({"max_prompts": 0}, "max_prompts", ">= 1 or null"),
        ({"pairing": "best_vs_median"}, "pairing", "allowed: 'best_vs_worst'"),
        ({"reference": "base"}, "reference", "allowed: 'round_start', 'sft'"),
        ({"judge": "reward_model:"}, "judge", "name the reward model"),
        ({"judge": "reward_model:/rm", "judge_model": "x"}, "judge_model", "for pairwise judges"),
    ],
)
def test_config_errors_name_the_key(section, key, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        build(OnPolicyConfig, {"enabled": True, **section}, "preference.on_policy")
    assert info.value.key == f"preference.on_policy.{key}"


def test_config_nests_as_a_section():
    """The snippet the preference section takes: ``on_policy: OnPolicyConfig = field(default_factory=...)``."""

    @dataclass(frozen=True)
    class Section:
        on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    assert build(Section, {}).on_policy.enabled is False
    section = {"on_policy": {"enabled": True, "rounds": 3, "samples_per_prompt": 4, "judge": "reward_model:/m/rm"}}
    built = build(Section, section)
    assert built.on_policy == OnPolicyConfig(enabled=True, rounds=3, samples_per_prompt=4, judge="reward_model:/m/rm")
    assert built.on_policy.reward_model_spec == "/m/rm"
    with pytest.raises(ConfigError) as info:
        build(Section, {"on_policy": {"enabled": True, "sample_per_prompt": 4}}, "preference")
    assert info.value.key == "preference.on_policy.sample_per_prompt" and "samples_per_prompt" in str(info.value)
    with pytest.raises(ConfigError, match=r"on_policy\.enabled is false; set enabled: true") as info:
        build(Section, {"on_policy": {"rounds": 3}}, "preference")
    assert info.value.key == "preference.on_policy.rounds"


def test_judge_options_and_reference():
    evaluation = {"judge_model": "embedded:smollm2-135m-instruct", "judge_base_url": None, "judge_concurrency": 4}
    assert OnPolicyConfig(enabled=True).judge_options(evaluation) == evaluation
    assert OnPolicyConfig(judge_model="tiny").judge_options(evaluation)["judge_model"] == "tiny"
    assert OnPolicyConfig(reference="round_start").reference_for("round-1/model", "sft/model") == "round-1/model"
    assert OnPolicyConfig(reference="sft").reference_for("round-1/model", "sft/model") == "sft/model"


# ----------------------------------------------------------------------------- prompts


def test_read_prompts_keeps_unique_single_turn_prompts(tmp_path):
    rows = [
        {"id": "a", "tree_id": "t1", "prompt": [{"role": "user", "content": "First?"}], "chosen": "x"},
        {"id": "b", "tree_id": "t1", "prompt": [{"role": "user", "content": "First?"}], "chosen": "y"},
        {"id": "c", "prompt_id": "g2", "prompt": "Second?"},
        {"id": "d", "instruction": "Third?"},
        {"id": "e", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"id": "f", "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"id": "g", "prompt": "   "},
        {"id": "h", "text": "no prompt here"},
    ]
    write_jsonl(tmp_path / "p.jsonl", rows)
    source = read_prompts(tmp_path / "p.jsonl")
    assert [(p.prompt_id, p.instruction) for p in source.prompts] == [
        ("t1", "First?"),
        ("g2", "Second?"),
        (source.prompts[2].prompt_id, "Third?"),
    ]
    assert source.prompts[2].prompt_id.startswith("prompt-")
    assert source.skipped == {
        "duplicate_prompt": 1,
        "multi_turn_or_system_prompt": 2,
        "empty_prompt": 1,
        "no_prompt_field": 1,
    }
    (tmp_path / "bad.jsonl").write_text('{"instruction": "ok"}\nnot json\n')
    with pytest.raises(OnPolicyError, match=r"bad\.jsonl:2: not valid JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(OnPolicyError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_rounds_take_disjoint_windows_of_one_permutation():
    source = PromptSource("s", [RoundPrompt(f"id{i}", f"Prompt {i}?") for i in range(5)])
    windows = [round_prompts(source, r, 2, seed=7) for r in range(3)]
    assert [len(w) for w in windows] == [2, 2, 2]
    first_two = [p.prompt_id for w in windows[:2] for p in w]
    assert len(set(first_two)) == 4  # rounds 0 and 1 share no prompt
    assert {p.prompt_id for w in windows for p in w} == {f"id{i}" for i in range(5)}  # round 2 wraps around
    assert windows[2][1] == windows[0][0]
    assert round_prompts(source, 0, 2, seed=7) == windows[0]
    assert round_prompts(source, 0, None, seed=7) == source.prompts
    assert round_prompts(source, 4, 10, seed=7) == source.prompts
    with pytest.raises(OnPolicyError, match="no usable single-turn prompt"):
        round_prompts(PromptSource("empty.jsonl", [], {"multi_turn_or_system_prompt": 3}), 0, None, 1)


def test_eval_instructions_never_become_training_prompts():
    source = PromptSource("s", [RoundPrompt("a", "What is  2+2?"), RoundPrompt("b", "Name a city.")])
    kept = drop_eval_prompts(source, ["What is 2+2?\n", "Unrelated"])
    assert [p.prompt_id for p in kept.prompts] == ["b"] and kept.skipped == {"in_eval_set": 1}


def test_train_prompts_come_from_the_prepared_train_set(tmp_path):
    from steps.data import prepare_oasst
    from steps.onpolicy.prompts import load_round_prompts

    prepared = prepare_oasst("embedded", tmp_path / "data")
    train = read_jsonl(Path(prepared.output_dir) / "preference.train.jsonl")
    dev = read_jsonl(Path(prepared.output_dir) / "preference.dev.jsonl")
    expected = list(dict.fromkeys(r["prompt"][0]["content"] for r in train if len(r["prompt"]) == 1))
    prompts, record = load_round_prompts("train", prepared.output_dir, 0, None, 1)
    assert [p.instruction for p in prompts] == expected and record["round_prompts"] == len(expected)
    assert not {p.instruction for p in prompts} & {r["prompt"][0]["content"] for r in dev}
    with pytest.raises(OnPolicyError, match="needs the prepared data directory"):
        load_round_prompts("train", None, 0, None, 1)


# ----------------------------------------------------------------------------- pair selection


def _select(scores, pairing, min_margin):
    counts: Counter = Counter()
    pairs = select_pairs(scores, pairing, min_margin, counts)
    return [(p.chosen, p.rejected, round(p.margin, 9)) for p in pairs], {k: v for k, v in counts.items() if v}


def test_best_vs_worst_by_hand():
    assert _select([0.2, 0.9, 0.5, 0.9], "best_vs_worst", 0.0) == (
        [(1, 0, 0.7)],
        {"candidate_pairs": 1, "pairs_kept": 1},
    )
    # all equal: best is the first, worst the last, and the pair is a tie
    assert _select([0.5, 0.5, 0.5], "best_vs_worst", 0.0) == ([], {"candidate_pairs": 1, "dropped_ties": 1})
    assert _select([0.5, 0.6], "best_vs_worst", 0.25) == ([], {"candidate_pairs": 1, "dropped_small_margin": 1})
    assert _select([None, 0.3], "best_vs_worst", 0.0) == (
        [],
        {"unscored_answers": 1, "prompts_without_two_answers": 1},
    )
    assert _select([0.3], "best_vs_worst", 0.0) == ([], {"prompts_without_two_answers": 1})


def test_best_vs_rest_and_all_pairs_by_hand():
    scores = [0.2, 0.9, 0.5, 0.9]
    assert _select(scores, "best_vs_rest", 0.35) == (
        [(1, 0, 0.7), (1, 2, 0.4)],
        {"candidate_pairs": 3, "dropped_ties": 1, "pairs_kept": 2},
    )
    assert _select(scores, "best_vs_rest", 0.5) == (
        [(1, 0, 0.7)],
        {"candidate_pairs": 3, "dropped_ties": 1, "dropped_small_margin": 1, "pairs_kept": 1},
    )
    assert _select(scores, "all_pairs", 0.35) == (
        [(1, 0, 0.7), (3, 0, 0.7), (1, 2, 0.4), (3, 2, 0.4)],
        {"candidate_pairs": 6, "dropped_ties": 1, "dropped_small_margin": 1, "pairs_kept": 4},
    )
    assert select_pairs([3.0, -1.0], "best_vs_worst", 0, Counter()) == [ChosenPair(0, 1, 4.0)]


def test_pairwise_scores_by_hand():
    # (shown first, shown second, P(second wins))
    outcomes = [(0, 1, 0.8), (2, 0, 0.3), (1, 2, 0.5), (1, 0, None)]
    assert mean_win_scores(3, outcomes) == pytest.approx([(0.2 + 0.3) / 2, (0.8 + 0.5) / 2, (0.7 + 0.5) / 2])
    assert mean_win_scores(3, [(0, 1, None)]) == [None, None, None]


def test_comparisons_cover_each_pair_once_and_balance_positions():
    assert comparisons(2) == [(0, 1)]
    assert comparisons(4) == [(0, 1), (2, 0), (0, 3), (1, 2), (3, 1), (2, 3)]
    for count in (3, 4, 5, 6):
        shown = comparisons(count)
        assert sorted(tuple(sorted(pair)) for pair in shown) == [
            (i, j) for i in range(count) for j in range(i + 1, count)
        ]
        first = Counter(a for a, _ in shown)
        assert all(abs(2 * first[i] - (count - 1)) <= 1 for i in range(count))  # first in about half


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from steps.models import load_tokenizer

    return load_tokenizer("tiny")


def _by_prompt(rows):
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(row["prompt_id"], []).append(row["output"])
    return out


def test_sampling_is_seeded_per_round_and_sample_and_reused(tmp_path, monkeypatch, tiny_tokenizer):
    from steps.chat import encode_prompt_response
    from steps.onpolicy import sampling

    first = sampling.sample_round("tiny", PROMPTS, small(), 0, tmp_path / "a", QUIET)
    again = sampling.sample_round("tiny", PROMPTS, small(), 0, tmp_path / "b", QUIET)
    assert [r["output"] for r in first.rows] == [r["output"] for r in again.rows]
    assert [(r["prompt_id"], r["sample"]) for r in first.rows] == [(p.prompt_id, s) for p in PROMPTS for s in range(3)]
    for outputs in _by_prompt(first.rows).values():
        assert len(set(outputs)) > 1  # samples of a prompt draw from their own seeds
    other_round = sampling.sample_round("tiny", PROMPTS, small(), 1, tmp_path / "c", QUIET)
    assert [r["output"] for r in other_round.rows] != [r["output"] for r in first.rows]
    # sample-major requests: a round with 2 samples per prompt draws the first 2 of the round with 3
    fewer = sampling.sample_round("tiny", PROMPTS, small(samples_per_prompt=2), 0, tmp_path / "d", QUIET)
    assert _by_prompt(fewer.rows) == {k: v[:2] for k, v in _by_prompt(first.rows).items()}

    for row in first.rows:
        prompt_ids, answer_ids = encode_prompt_response(
            tiny_tokenizer, [{"role": "user", "content": row["instruction"]}], row["output"]
        )
        assert (row["prompt_tokens"], row["answer_tokens"], row["usable"]) == (len(prompt_ids), len(answer_ids), True)
    meta = read_json(tmp_path / "a" / "samples.json")
    assert meta["answer_tokens"] == sum(r["answer_tokens"] for r in first.rows) and meta["samples"] == 9
    assert meta["generation"]["seed"] == sampling.round_seed(11, 0) != sampling.round_seed(11, 1)

    def no_generation(*args, **kwargs):
        raise AssertionError("a retried round generated again")

    monkeypatch.setattr(sampling, "answer_instructions", no_generation)
    reused = sampling.sample_round("tiny", PROMPTS, small(), 0, tmp_path / "a", QUIET)
    assert reused.reused and reused.rows == first.rows
    with pytest.raises(AssertionError, match="generated again"):  # other settings: not the same samples
        sampling.sample_round("tiny", PROMPTS, small(max_new_tokens=7), 0, tmp_path / "a", QUIET)
    samples_file = tmp_path / "a" / "samples.jsonl"
    samples_file.write_text(samples_file.read_text().replace(first.rows[0]["output"], "edited", 1))
    with pytest.raises(OnPolicyError, match="does not match"):
        sampling.read_samples(tmp_path / "a")
    with pytest.raises(AssertionError, match="generated again"):  # a file that does not match its record
        sampling.sample_round("tiny", PROMPTS, small(), 0, tmp_path / "a", QUIET)


# ----------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def sampled_round(tmp_path_factory):
    from steps.onpolicy.sampling import sample_round

    where = tmp_path_factory.mktemp("sampled") / "round-000"
    sample_round("tiny", PROMPTS, small(samples_per_prompt=4), 0, where, QUIET)
    return where


def _copy_round(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("samples.jsonl", "samples.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def _reward_model_dir(path: Path, tokenizer, pad_token_id: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(123)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # spread the rewards
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("pad_token_id", [0, 2], ids=["pad_is_padding", "pad_is_end_of_turn"])
def test_reward_model_scores_equal_a_forward_pass_per_answer(tmp_path, sampled_round, tiny_tokenizer, pad_token_id):
    import torch
    from transformers import AutoModelForSequenceClassification

    from steps.chat import encode_prompt_response
    from steps.onpolicy.judging import judge_round
    from steps.onpolicy.pairs import build_pairs

    rm_dir = _reward_model_dir(tmp_path / "rm", tiny_tokenizer, pad_token_id)
    where = _copy_round(sampled_round, tmp_path / "round")
    cfg = small(samples_per_prompt=4, judge=f"reward_model:{rm_dir}", batch_size=3)
    judged = judge_round(where, cfg, run=QUIET)

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    samples = read_jsonl(where / "samples.jsonl")
    lengths = set()
    expected = []
    for row in samples:
        prompt_ids, answer_ids = encode_prompt_response(
            tiny_tokenizer, [{"role": "user", "content": row["instruction"]}], row["output"]
        )
        lengths.add(len(prompt_ids) + len(answer_ids))
        with torch.no_grad():
            expected.append(float(model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0, 0]))
    assert len(lengths) > 1  # batches really mixed lengths
    assert [s["score"] for s in judged.scores] == pytest.approx(expected, abs=1e-5)
    assert judged.meta["judge_prompt_tokens"] == sum(r["tokens"] for r in judged.judgements)
    assert judged.meta["judgements"] == judged.meta["answers"] == len({(r["prompt_id"], r["output"]) for r in samples})

    pairs = build_pairs(where, cfg)
    for row in pairs.rows:
        rewards = {s["output"]: e for s, e in zip(samples, expected) if s["prompt_id"] == row["prompt_id"]}
        assert row["chosen"][0]["content"] == max(rewards, key=rewards.get)
        assert row["rejected"][0]["content"] == min(rewards, key=rewards.get)
        assert row["margin"] == pytest.approx(max(rewards.values()) - min(rewards.values()), abs=1e-5)


def test_reward_model_spec_must_be_a_classifier_directory(tmp_path, sampled_round):
    from steps.onpolicy.judging import judge_round

    where = _copy_round(sampled_round, tmp_path / "round")
    with pytest.raises(OnPolicyError, match="not a tiny model spec"):
        judge_round(where, small(samples_per_prompt=4, judge="reward_model:tiny"), run=QUIET)


def test_local_pairwise_judge_round_is_cached_and_resumable(tmp_path, sampled_round, monkeypatch, tiny_tokenizer):
    from steps.onpolicy import judging
    from steps.onpolicy.pairs import build_pairs
    from steps.train.batching import tokenize_pairs

    where = _copy_round(sampled_round, tmp_path / "round")
    cfg = small(samples_per_prompt=4, judge="local_logprob", judge_model="tiny")
    options = cfg.judge_options({"judge_model": "embedded:smollm2-135m-instruct"})
    judged = judging.judge_round(where, cfg, judge_options=options, run=QUIET)
    samples = read_jsonl(where / "samples.jsonl")
    distinct = Counter(prompt for prompt, _ in {(r["prompt_id"], r["output"]) for r in samples})
    assert (
        judged.meta["judgements"] == judged.meta["judgements_new"] == sum(n * (n - 1) // 2 for n in distinct.values())
    )
    assert judged.meta["judge"] == "local_logprob:tiny" and judged.meta["weak_judge"] is True

    # each answer's score: its mean probability of beating the others, from the judgements as written
    wins: dict[tuple[str, int], list[float]] = {}
    for row in judged.judgements:
        p_second = row["preference"] - 1
        wins.setdefault((row["prompt_id"], row["answer_2"]), []).append(p_second)
        wins.setdefault((row["prompt_id"], row["answer_1"]), []).append(1 - p_second)
    for score in judged.scores:
        values = wins[(score["prompt_id"], score["answer"])]
        assert score["score"] == pytest.approx(sum(values) / len(values))
    token_total = sum(r["raw_completion"]["usage"]["prompt_tokens"] for r in judged.judgements)
    assert judged.meta["judge_prompt_tokens"] == token_total

    # written once: a retried round reuses the scores; without them, every judgement comes from the cache
    from steps.evaluate import judges

    make_judge = judges.make_judge

    def judge_that_refuses(*args, **kwargs):
        judge = make_judge(*args, **kwargs)

        def no_judging(*args, **kwargs):
            raise AssertionError("judged again")

        judge.judge_pairs = no_judging
        return judge

    monkeypatch.setattr(judges, "make_judge", judge_that_refuses)
    assert judging.judge_round(where, cfg, judge_options=options, run=QUIET).reused
    (where / "judging.json").unlink()
    rejudged = judging.judge_round(where, cfg, judge_options=options, run=QUIET)
    assert (rejudged.meta["judgements_cached"], rejudged.meta["judgements_new"]) == (judged.meta["judgements"], 0)
    assert rejudged.scores == judged.scores and rejudged.meta["judge_requests"] == 0
    (where / "judging.json").unlink()
    (where / "judge_cache").rename(where / "other_cache")
    with pytest.raises(AssertionError, match="judged again"):  # the refusal is real: an empty cache must judge
        judging.judge_round(where, cfg, judge_options=options, run=QUIET)
    (where / "other_cache").rename(where / "judge_cache")
    monkeypatch.setattr(judges, "make_judge", make_judge)
    judging.judge_round(where, cfg, judge_options=options, run=QUIET)

    pairs = build_pairs(where, cfg)
    stats = read_json(where / "round_stats.json")
    assert stats["pairs_kept"] == len(pairs.rows) == len(read_jsonl(where / "preference.train.jsonl"))
    assert stats["candidate_pairs"] == 3 and stats["pairs_kept"] + stats["dropped_ties"] == 3
    examples, length_stats = tokenize_pairs(pairs.rows, tiny_tokenizer, 512)
    assert length_stats.kept == len(pairs.rows) and all(e.chosen_ids != e.rejected_ids for e in examples)

    with pytest.raises(OnPolicyError, match="kept no pair"):
        build_pairs(where, small(samples_per_prompt=4, min_margin=2.0))  # win probabilities differ by < 1
    assert not (where / "preference.train.jsonl").exists()
    assert read_json(where / "round_stats.json")["dropped_small_margin"] == stats["pairs_kept"]


def test_pair_rows_are_what_the_trainer_reads(tmp_path, tiny_tokenizer):
    """A hand-made round (fixed answers and rewards) gives rows in the prepared layout that tokenize_pairs reads as
    the prompt, chosen and rejected the scores say."""
    from steps.chat import encode_prompt_response
    from steps.io import atomic_write_files, jsonl_line
    from steps.onpolicy.judging import JUDGEMENTS_FILE, JUDGING_META_FILE, SCORES_FILE
    from steps.onpolicy.pairs import build_pairs
    from steps.onpolicy.sampling import SAMPLES_FILE, SAMPLES_META_FILE
    from steps.train.batching import tokenize_pairs

    answers = {"q1": ["Blue.", "Red.", "Blue.", "Green."], "q2": ["Four.", "Five.", "Four.", "Four."]}
    rewards = {"Blue.": 1.0, "Red.": 3.0, "Green.": 0.5, "Four.": 2.0, "Five.": 2.0}
    samples, scores = [], []
    for index, (prompt_id, texts) in enumerate(answers.items()):
        distinct = list(dict.fromkeys(texts))
        for sample, text in enumerate(texts):
            samples.append(
                {
                    "prompt_id": prompt_id,
                    "prompt_index": index,
                    "sample": sample,
                    "instruction": f"Question {prompt_id}?",
                    "output": text,
                    "prompt_tokens": 1,
                    "answer_tokens": 2,
                    "usable": True,
                }
            )
            scores.append(
                {"prompt_id": prompt_id, "sample": sample, "answer": distinct.index(text), "score": rewards[text]}
            )
    data = {
        SAMPLES_FILE: b"".join(map(jsonl_line, samples)),
        SCORES_FILE: b"".join(map(jsonl_line, scores)),
        JUDGEMENTS_FILE: b"",
    }
    samples_meta = {
        "round": 4,
        "policy": "p",
        "fingerprint": "f",
        "prompts": 2,
        "samples_per_prompt": 4,
        "samples": 8,
        "unusable": 0,
        "prompt_tokens": 8,
        "answer_tokens": 16,
        "seconds": 1.0,
        "samples_sha256": hashlib.sha256(data[SAMPLES_FILE]).hexdigest(),
    }
    judging_meta = {
        "fingerprint": "g",
        "round": 4,
        "judge": "reward_model:x",
        "scoring": "reward",
        "answers": 5,
        "judgements": 5,
        "judgements_cached": 0,
        "judgements_new": 5,
        "judge_requests": 5,
        "judge_prompt_tokens": 50,
        "judge_completion_tokens": 0,
        "seconds": 2.0,
        **{f"{n}_sha256": hashlib.sha256(data[n]).hexdigest() for n in (SCORES_FILE, JUDGEMENTS_FILE)},
    }
    files = {tmp_path / name: blob for name, blob in data.items()}
    files[tmp_path / SAMPLES_META_FILE] = json.dumps(samples_meta).encode()
    files[tmp_path / JUDGING_META_FILE] = json.dumps(judging_meta).encode()
    atomic_write_files(files)
    write_jsonl(tmp_path / "dev.jsonl", [{"id": "d1", "prompt": "x", "chosen": "a", "rejected": "b"}])

    pairs = build_pairs(tmp_path, small(samples_per_prompt=4, pairing="best_vs_rest"), dev_file=tmp_path / "dev.jsonl")
    # q1: best Red. (sample 1) vs Blue. (first at sample 0) and Green. (sample 3); q2: Four./Five. tie
    assert [(r["prompt_id"], r["chosen_sample"], r["rejected_sample"], r["margin"]) for r in pairs.rows] == [
        ("q1", 1, 0, 2.0),
        ("q1", 1, 3, 2.5),
    ]
    assert pairs.rows[0] == {
        "id": "onpolicy-r4-q1-s1-s0",
        "prompt_id": "q1",
        "prompt": [{"role": "user", "content": "Question q1?"}],
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "Blue."}],
        "round": 4,
        "chosen_sample": 1,
        "rejected_sample": 0,
        "chosen_score": 3.0,
        "rejected_score": 1.0,
        "margin": 2.0,
    }
    stats = read_json(tmp_path / "round_stats.json")
    assert {k: stats[k] for k in ("candidate_pairs", "dropped_ties", "dropped_small_margin", "pairs_kept")} == {
        "candidate_pairs": 3,
        "dropped_ties": 1,
        "dropped_small_margin": 0,
        "pairs_kept": 2,
    }
    assert stats["tokens"]["answers_per_prompt"] == 8 and stats["tokens"]["judged_per_prompt"] == 25
    assert read_jsonl(tmp_path / "preference.dev.jsonl")[0]["id"] == "d1"

    examples, length_stats = tokenize_pairs(read_jsonl(tmp_path / "preference.train.jsonl"), tiny_tokenizer, 256)
    prompt_ids, red = encode_prompt_response(tiny_tokenizer, [{"role": "user", "content": "Question q1?"}], "Red.")
    _, blue = encode_prompt_response(tiny_tokenizer, [{"role": "user", "content": "Question q1?"}], "Blue.")
    assert length_stats.kept == 2
    assert (examples[0].prompt_ids, examples[0].chosen_ids, examples[0].rejected_ids) == (prompt_ids, red, blue)
