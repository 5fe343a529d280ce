"""evaluate_model / reference_outputs_for end to end on the tiny model (generation, judging, scoring, files)."""
from __future__ import annotations

import json

from steps.evaluate import evaluate_model, reference_outputs_for
from steps.evaluate.eval_sets import load_eval_set


def test_evaluate_model_writes_files_and_labels(tiny_model_factory, tokenizer, tmp_path):
    eval_set = load_eval_set("embedded", max_instructions=6)
    policy = tiny_model_factory(seed=1)
    refs = reference_outputs_for(eval_set, "tiny", model=tiny_model_factory(seed=0), tokenizer=tokenizer,
                                 max_new_tokens=6, show_progress=False)
    assert [r["generator"] for r in refs] == ["reference:tiny"] * 6
    assert [r["instruction"] for r in refs] == eval_set.instructions

    judge_model = tiny_model_factory(seed=2)
    kwargs = dict(generator="policy-tiny", out_dir=tmp_path / "eval", judge_name="local_logprob", judge_model="tiny",
                  judge_kwargs={"model": judge_model, "tokenizer": tokenizer}, max_new_tokens=6,
                  cache_dir=tmp_path / "cache", model=policy, tokenizer=tokenizer, show_progress=False)
    result = evaluate_model("tiny", eval_set, refs, **kwargs)

    files = {name: json.loads((tmp_path / "eval" / name).read_text()) for name in
             ("model_outputs.json", "annotations.json", "metrics.json")}
    assert [r["instruction"] for r in files["model_outputs.json"]] == eval_set.instructions
    annotations = files["annotations.json"]
    assert len(annotations) == 6 and all(1 <= a["preference"] <= 2 for a in annotations)
    assert {a["generator_1"] for a in annotations} == {"reference:tiny"}
    assert files["metrics.json"]["win_rate"] == result["win_rate"]
    expected_wr = 100 * sum(a["preference"] - 1 for a in annotations) / len(annotations)
    assert abs(result["win_rate"] - expected_wr) < 1e-9
    assert result["judge"] == "local_logprob:tiny" and result["weak_judge"] is True
    assert result["eval_set"] == "prefflow_embedded" and result["subset"] is True
    assert result["reference_generator"] == "reference:tiny"
    assert result["lc_method"] == "length_controlled_v1_subset_no_gamed_regularisation_no_instruction_difficulty"
    assert result["length_controlled_winrate"] is not None
    assert result["generation"]["max_new_tokens"] == 6 and result["generation"]["seed"] == 1814
    assert result["n_total"] == 6

    # a retried step reuses the outputs and the judgements: no forward pass at all
    calls = {"n": 0}
    for m in (policy, judge_model):
        m.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    again = evaluate_model("tiny", eval_set, refs, **kwargs)
    assert calls["n"] == 0
    assert again["win_rate"] == result["win_rate"]


def test_reference_outputs_from_the_eval_set(shared_dir):
    eval_set = load_eval_set(str(shared_dir / "alpaca_eval" / "eval_set.json"), max_instructions=3)
    refs = reference_outputs_for(eval_set, "tiny")
    assert [r["generator"] for r in refs] == ["gpt4_1106_preview"] * 3
    assert [r["output"] for r in refs] == [r["output"] for r in eval_set.records]
