"""Judges: the local log-prob judge reproduces alpaca_eval's official annotator mechanism; caching; errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from steps.evaluate.annotate import AnnotationInputError, annotate
from steps.evaluate.judges import JudgeError, LocalLogprobJudge, make_judge
from steps.evaluate.judges.annotator_prompt import preference_from_top_logprobs, switch_decisions

PAIRS = [
    {"instruction": "What is the capital of France?", "output": "Paris.", "ref": "The capital of France is Paris."},
    {"instruction": "Give me a synonym for happy.", "output": "Glad", "ref": "Joyful."},
]


def _installed_template() -> str:
    return _installed_template_path().read_text(encoding="utf-8")


def _installed_template_path() -> Path:
    import alpaca_eval

    return Path(alpaca_eval.__file__).parent / "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"


def _outputs():
    model = [{"instruction": p["instruction"], "output": p["output"], "generator": "policy"} for p in PAIRS]
    ref = [{"instruction": p["instruction"], "output": p["ref"], "generator": "reference"} for p in PAIRS]
    return model, ref


def _forward_counter(model):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    model.register_forward_hook(hook)
    return calls


# ---- the official parser and swap ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top",
    [
        {"m": -0.1, "M": -2.5},
        {"M": -7.5842e-06, "m": -11.953133, "Based": -15.0},
        {"m": -0.3},  # M missing: probability 0
        {"M": -0.3, "The": -1.0},  # m missing
        {"The": -0.1, "m": -4.0, "M": -4.0, "Both": -5.0},
        {"The": -0.1},  # neither identifier: NaN
    ],
)
def test_parser_equals_alpaca_eval(top):
    from alpaca_eval.completion_parsers import logprob_parser

    completion = {
        "logprobs": {
            "content": [
                {"token": next(iter(top)), "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}
            ]
        }
    }
    theirs = logprob_parser(completion, numerator_token="m", denominator_tokens=["m", "M"], is_binarize=False)[0]
    ours = preference_from_top_logprobs(top)
    if math.isnan(theirs):
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(theirs, abs=1e-12)
        assert 1.0 <= ours <= 2.0


def test_swap_equals_alpaca_eval_seeded_choice():
    from alpaca_eval.utils import random_seeded_choice

    instructions = [p["instruction"] for p in PAIRS] + ["Write a haiku.", "2+2?", "Explain DPO", "ünïcødé ✓"]
    expected = [random_seeded_choice(seed="is_switched_outputs" + i + "0", choices=[False, True]) for i in instructions]
    assert switch_decisions(instructions) == expected
    assert len(set(expected)) == 2  # both orders occur in this sample


def test_swap_explains_official_annotations(shared_dir):
    """Official rows: preference == parsed raw logprobs, flipped (3 - x) exactly where our swap says so."""
    with open(shared_dir / "alpaca_eval" / "annotations" / "alpaca-7b.json", encoding="utf-8") as fh:
        rows = [r for r in json.load(fh) if r.get("raw_completion")][:200]
    switched = switch_decisions([r["instruction"] for r in rows])
    official, ours = [], []
    for row, swap in zip(rows, switched):
        top = {t["token"]: t["logprob"] for t in row["raw_completion"]["logprobs"]["content"][0]["top_logprobs"]}
        presented = preference_from_top_logprobs(top)
        if abs(presented - 1.5) >= 0.01:  # near-draws cannot tell the two orders apart
            official.append(row["preference"])
            ours.append(3 - presented if swap else presented)
    assert len(ours) > 150
    assert official == pytest.approx(ours, abs=1e-6)  # every mismatching row shows at once


# ---- prompt -------------------------------------------------------------------------------------------------


def test_prompt_contains_installed_template(tokenizer):
    judge = LocalLogprobJudge("embedded:smollm2-135m-instruct", tokenizer=tokenizer)
    instruction, out1, out2 = "Name a prime.", "7 is prime.", "Nine."
    filled = (
        _installed_template()
        .replace("{instruction}", instruction)
        .replace("{output_1}", out1)
        .replace("{output_2}", out2)
    )
    system = filled.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0].strip()
    user = filled.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0].strip()
    rendered = judge.render(instruction, out1, out2)
    assert system in rendered and user in rendered
    assert '"model_identifier": "m"' in rendered and f'"""{out1}"""' in rendered
    assert rendered.index(out1) < rendered.index(out2)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = judge.identifier_ids()
    assert tokenizer.decode([ids["m"]]) == "m" and tokenizer.decode([ids["M"]]) == "M"
    assert judge.weak_judge and judge.label == "local_logprob:embedded:smollm2-135m-instruct"


# ---- the local judge end to end -----------------------------------------------------------------------------


def test_local_judge_end_to_end_and_cache(tiny_model_factory, tokenizer, tmp_path):
    model = tiny_model_factory(seed=0)
    calls = _forward_counter(model)
    judge = LocalLogprobJudge("tiny", model=model, tokenizer=tokenizer, show_progress=False)
    model_outputs, ref_outputs = _outputs()
    first = annotate(model_outputs, ref_outputs, judge, cache_dir=tmp_path / "cache")
    assert calls["n"] >= 2  # the shared prefix once, then one pass per judgement
    assert [r["instruction"] for r in first] == [p["instruction"] for p in PAIRS]
    assert [(r["output_1"], r["output_2"]) for r in first] == [(p["ref"], p["output"]) for p in PAIRS]
    assert {(r["generator_1"], r["generator_2"], r["annotator"]) for r in first} == {
        ("reference", "policy", "local_logprob:tiny")
    }
    assert all(1.0 <= r["preference"] <= 2.0 for r in first)
    presented = [preference_from_top_logprobs(r["raw_completion"]["identifier_logprobs"]) for r in first]
    expected = [3 - p if r["raw_completion"]["is_switched_outputs"] else p for p, r in zip(presented, first)]
    assert [r["preference"] for r in first] == pytest.approx(expected)

    calls["n"] = 0
    fresh = LocalLogprobJudge("tiny", model=model, tokenizer=tokenizer, show_progress=False)
    second = annotate(model_outputs, ref_outputs, fresh, cache_dir=tmp_path / "cache")
    assert calls["n"] == 0 and fresh.forward_passes == 0
    assert [r["preference"] for r in second] == [r["preference"] for r in first]


def test_local_judge_matches_alpaca_eval_pipeline(tiny_model_factory, tokenizer, tmp_path):
    """alpaca_eval's own PairwiseAnnotator (its prompt, swap and parser) driven by the same model gives the same
    preferences as the local judge (which additionally reuses a prefix KV cache)."""
    import torch
    from alpaca_eval.annotators import PairwiseAnnotator
    from alpaca_eval.utils import prompt_to_chatml

    from steps.chat import render_prompt

    model = tiny_model_factory(seed=3)
    ids_m, ids_M = tokenizer.convert_tokens_to_ids("m"), tokenizer.convert_tokens_to_ids("M")

    def completions(prompts, **_):
        out = []
        for prompt in prompts:
            text = render_prompt(
                tokenizer, [{"role": m["role"], "content": m["content"]} for m in prompt_to_chatml(prompt)]
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
            top = [{"token": "m", "logprob": float(logprobs[ids_m])}, {"token": "M", "logprob": float(logprobs[ids_M])}]
            out.append({"logprobs": {"content": [{"token": "m", "top_logprobs": top}]}})
        return {"completions_all": out}

    config_dir = tmp_path / "configs" / "tiny_weighted"
    config_dir.mkdir(parents=True)
    template = _installed_template_path()
    (config_dir / "configs.yaml").write_text(
        "tiny_weighted:\n"
        f'  prompt_template: "{template}"\n'
        '  fn_completion_parser: "logprob_parser"\n'
        "  completion_parser_kwargs:\n"
        '    numerator_token: "m"\n'
        '    denominator_tokens: ["m", "M"]\n'
        "    is_binarize: false\n"
        '  completion_key: "completions_all"\n'
        "  batch_size: 1\n"
    )
    pairs = [{"instruction": p["instruction"], "output_1": p["ref"], "output_2": p["output"]} for p in PAIRS]
    pairs += [
        {"instruction": "Write a haiku.", "output_1": "Leaves fall", "output_2": "Snow on the pine"},
        {"instruction": "2+2?", "output_1": "4", "output_2": "four"},
    ]
    theirs = PairwiseAnnotator(
        annotators_config=str(config_dir / "configs.yaml"), caching_path=None, fn_completions=completions
    ).annotate_pairs(pairs)
    theirs_by_instruction = {r["instruction"]: r["preference"] for r in theirs}
    assert len(theirs_by_instruction) == len(pairs)

    judge = LocalLogprobJudge("tiny", model=model, tokenizer=tokenizer, show_progress=False)
    ours = annotate(
        [{"instruction": p["instruction"], "output": p["output_2"]} for p in pairs],
        [{"instruction": p["instruction"], "output": p["output_1"]} for p in pairs],
        judge,
    )
    assert {True, False} == set(switch_decisions([p["instruction"] for p in pairs]))
    assert [r["preference"] for r in ours] == pytest.approx(
        [theirs_by_instruction[r["instruction"]] for r in ours], abs=1e-4
    )


def test_identical_outputs_are_a_draw_without_judging(tiny_model_factory, tokenizer):
    model = tiny_model_factory()
    calls = _forward_counter(model)
    judge = LocalLogprobJudge("tiny", model=model, tokenizer=tokenizer, show_progress=False)
    same = [{"instruction": "Say hi.", "output": "Hi!", "generator": "a"}]
    rows = annotate(same, [dict(same[0], generator="b")], judge)
    assert rows[0]["preference"] == 1.5 and calls["n"] == 0


def test_interrupted_cache_line_is_skipped(tiny_model_factory, tokenizer, tmp_path):
    model = tiny_model_factory()
    judge = LocalLogprobJudge("tiny", model=model, tokenizer=tokenizer, show_progress=False)
    model_outputs, ref_outputs = _outputs()
    annotate(model_outputs, ref_outputs, judge, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("*.jsonl")
    lines = cache_file.read_text().splitlines()
    cache_file.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # crash mid-write
    fresh = LocalLogprobJudge("tiny", model=model, tokenizer=tokenizer, show_progress=False)
    annotate(model_outputs, ref_outputs, fresh, cache_dir=tmp_path)
    assert fresh.judgements == 1


# ---- bad input ----------------------------------------------------------------------------------------------


def test_outputs_must_pair_by_instruction(tokenizer):
    judge = LocalLogprobJudge("tiny", tokenizer=tokenizer)
    model_outputs, ref_outputs = _outputs()
    with pytest.raises(AnnotationInputError, match="row 1: model and reference instructions differ"):
        annotate(model_outputs, [ref_outputs[0], dict(ref_outputs[1], instruction="Other")], judge)
    with pytest.raises(AnnotationInputError, match="2 model outputs but 1 reference"):
        annotate(model_outputs, ref_outputs[:1], judge)


def test_unknown_annotator_lists_available():
    with pytest.raises(JudgeError, match="weighted_alpaca_eval_gpt4_turbo"):
        make_judge("alpaca_eval:no_such_annotator")
    with pytest.raises(JudgeError, match="unknown judge"):
        make_judge("gpt5_oracle")


def test_official_judge_needs_openai_key(monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(var, raising=False)
    judge = make_judge("alpaca_eval:weighted_alpaca_eval_gpt4_turbo")
    assert judge.label == "alpaca_eval:weighted_alpaca_eval_gpt4_turbo" and not judge.weak_judge
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        judge.check()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-a-real-key")
    judge.check()
    assert "sk-not-a-real-key" not in json.dumps(judge.metadata())


def test_missing_key_fails_before_generation(monkeypatch, tiny_model_factory, tokenizer, tmp_path):
    from steps.config import EvaluationConfig
    from steps.evaluate import EvalContext, ModelRun, evaluate_model
    from steps.evaluate.eval_sets import load_eval_set

    for var in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(var, raising=False)
    model = tiny_model_factory()
    calls = _forward_counter(model)
    eval_set = load_eval_set("embedded", max_instructions=2)
    refs = [{"instruction": i, "output": "x", "generator": "ref"} for i in eval_set.instructions]
    settings = EvaluationConfig(judge="alpaca_eval:weighted_alpaca_eval_gpt4_turbo")
    context = EvalContext(generator="tiny", out_dir=tmp_path, run=ModelRun(model=model, tokenizer=tokenizer))
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        evaluate_model("tiny", eval_set, refs, settings, context)
    assert calls["n"] == 0 and not (tmp_path / "model_outputs.json").exists()


def test_alpaca_eval_judge_plumbing_with_a_local_completion_function(tmp_path):
    """The alpaca_eval:<config> judge through alpaca_eval's PairwiseAnnotator, with a completion function that
    always gives P(m) = 0.8 for the output shown first: preference 1.2, or 1.8 where alpaca_eval swapped."""
    import alpaca_eval

    template = Path(alpaca_eval.__file__).parent / "evaluators_configs/alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"
    config = tmp_path / "configs" / "fixed_logprobs" / "configs.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(
        "fixed_logprobs:\n"
        f'  prompt_template: "{template}"\n'
        '  fn_completion_parser: "logprob_parser"\n'
        '  completion_parser_kwargs: {numerator_token: "m", denominator_tokens: ["m", "M"], is_binarize: false}\n'
        '  completion_key: "completions_all"\n'
        "  batch_size: 1\n"
    )
    seen = []

    def completions(prompts, **_):
        seen.extend(prompts)
        top = [{"token": "m", "logprob": math.log(0.8)}, {"token": "M", "logprob": math.log(0.2)}]
        return {"completions_all": [{"logprobs": {"content": [{"token": "m", "top_logprobs": top}]}} for _ in prompts]}

    judge = make_judge(f"alpaca_eval:{config}", fn_completions=completions, chunk_size=2)
    judge.check()
    instructions = ["Write a haiku.", "2+2?", "Explain DPO", "Name a prime."]
    model_outputs = [{"instruction": i, "output": f"model {i}", "generator": "policy"} for i in instructions]
    ref_outputs = [{"instruction": i, "output": f"reference {i}", "generator": "ref"} for i in instructions]
    rows = annotate(model_outputs, ref_outputs, judge, cache_dir=tmp_path / "cache")
    switched = switch_decisions(instructions)
    assert [r["preference"] for r in rows] == pytest.approx([1.8 if s else 1.2 for s in switched])
    assert all(r["annotator"] == f"alpaca_eval:{config}" for r in rows)
    assert len(seen) == 4
    annotate(model_outputs, ref_outputs, judge, cache_dir=tmp_path / "cache")
    assert len(seen) == 4  # all four from the cache


@pytest.mark.parametrize(
    "name, options, spec, max_chars",
    [
        ("local_logprob", {}, "embedded:smollm2-135m-instruct", 1500),
        ("local_logprob", {"judge_model": "tiny", "judge_max_chars": 200}, "tiny", 200),
        ("local_logprob:tiny", {"judge_model": "embedded:smollm2-135m-instruct"}, "tiny", 1500),  # the name's spec wins
    ],
)
def test_make_local_judge(name, options, spec, max_chars):
    judge = make_judge(name, device="cpu", **options)
    assert isinstance(judge, LocalLogprobJudge)
    assert judge.judge_model == spec and judge.judge_max_chars == max_chars
    assert judge.metadata()["judge_max_chars"] == max_chars and judge.metadata()["judge"] == f"local_logprob:{spec}"


@pytest.mark.parametrize(
    "options",
    [{"max_chars": 200}, {"max_output_chars": 200}, {"model_spec": "tiny"}, {"fn_completions": "openai_completions"}],
)
def test_local_judge_takes_no_other_keyword(options):
    """One name per knob: the former spellings are refused, not silently mapped or dropped."""
    with pytest.raises(JudgeError, match="are for 'alpaca_eval:' judges"):
        make_judge("local_logprob", **options)


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "1500"])
def test_bad_judge_max_chars(value):
    with pytest.raises(JudgeError, match="judge_max_chars must be an integer >= 1"):
        make_judge("local_logprob", judge_max_chars=value, device="cpu")


def test_local_options_do_not_reach_alpaca_eval_judges():
    judge = make_judge("alpaca_eval:weighted_alpaca_eval_gpt4_turbo", judge_model="tiny", judge_max_chars=200)
    assert judge.label == "alpaca_eval:weighted_alpaca_eval_gpt4_turbo" and judge.annotator_kwargs == {}


def test_cache_identity_is_stable():
    """The identity string is part of every cache key; it keeps its historical spelling so old caches stay valid."""
    judge = make_judge("local_logprob:tiny", judge_max_chars=200, device="cpu")
    assert judge.cache_identity == (
        "local_logprob:tiny|template=weighted_alpaca_eval_gpt4_turbo|max_output_chars=200|switch_seed=0|seed=0"
    )
    default = make_judge("local_logprob", device="cpu")
    assert default.cache_identity == (
        "local_logprob:embedded:smollm2-135m-instruct|template="
        "weighted_alpaca_eval_gpt4_turbo|max_output_chars=1500|switch_seed=0"
    )


def test_outputs_are_cut_at_judge_max_chars(tiny_model_factory, tokenizer):
    from steps.chat import render_prompt

    judge = LocalLogprobJudge(
        "tiny", model=tiny_model_factory(), tokenizer=tokenizer, judge_max_chars=12, show_progress=False
    )
    instruction, short, long = "Say something.", "Short.", "A long answer that goes on and on and on."
    result = judge.judge_one(instruction, short, long, switched=False)
    filled = (
        _installed_template()
        .replace("{instruction}", instruction)
        .replace("{output_1}", short)
        .replace("{output_2}", long[:12])
    )
    messages = [
        {"role": role, "content": filled.split(f"<|im_start|>{role}\n", 1)[1].split("<|im_end|>", 1)[0].strip()}
        for role in ("system", "user")
    ]
    expected = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    assert result["raw_completion"]["outputs_cut_at_chars"] == 12
    assert result["raw_completion"]["prompt_tokens"] == len(expected)
    assert judge.judge_one(instruction, short, short, switched=False)["raw_completion"]["outputs_cut_at_chars"] is None
