"""evaluate_model / reference_outputs_for end to end on the tiny model (generation, judging, scoring, files)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

from steps.config import EvaluationConfig
from steps.evaluate import (
    EvalContext,
    GenerationSettings,
    HeldoutScoring,
    ModelRun,
    evaluate_model,
    heldout_preference_metrics,
    reference_outputs_for,
    write_metrics,
)
from steps.evaluate.eval_sets import load_eval_set

GENERATION = GenerationSettings(max_new_tokens=6, batch_size=4)
#: metrics.json's keys, in order, for the local judge: alpaca_eval's metrics, then what produced them
METRICS_JSON_KEYS = [
    *("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "discrete_win_rate"),
    *("avg_length", "lc_method", "lc_assets", "lc_approximate_assets", "length_controlled_winrate"),
    *("lc_standard_error", "lc_unavailable_reason", "model", "generator", "judge", "weak_judge"),
    *("annotator_config", "judge_max_chars", "note", "judge_agreement", "judge_tokens", "judge_cost_usd"),
    *("judge_price", "judge_cost_note", "heldout_preference", "weight_change", "eval_set", "eval_set_source"),
    *("subset", "n_instructions", "reference_generator", "generation", "files", "provenance"),
]


def test_evaluate_model_writes_files_and_labels(tiny_model_factory, tokenizer, tmp_path, caplog):
    eval_set = load_eval_set("embedded", max_instructions=6)
    policy = tiny_model_factory(seed=1)
    reference_run = ModelRun(model=tiny_model_factory(seed=0), tokenizer=tokenizer, show_progress=False)
    refs = reference_outputs_for(eval_set, "tiny", GENERATION, reference_run)
    assert [r["generator"] for r in refs] == ["reference:tiny"] * 6
    assert [r["instruction"] for r in refs] == eval_set.instructions

    settings = EvaluationConfig(
        max_new_tokens=6,
        batch_size=4,
        judge="local_logprob",
        judge_model="tiny",
        judge_max_chars=300,
        agreement_registry=str(tmp_path / "registry.json"),
    )
    context = EvalContext(
        generator="policy-tiny",
        out_dir=tmp_path / "eval",
        run=ModelRun(model=policy, tokenizer=tokenizer, show_progress=False),
        cache_dir=tmp_path / "cache",
    )
    with caplog.at_level(logging.INFO, logger="steps.evaluate.evaluation"):
        evaluated = evaluate_model("tiny", eval_set, refs, settings, context)
    result = evaluated.metrics_json()

    files = {
        name: json.loads((tmp_path / "eval" / name).read_text())
        for name in ("model_outputs.json", "annotations.json", "metrics.json", "generation.json")
    }
    assert [r["instruction"] for r in files["model_outputs.json"]] == eval_set.instructions
    annotations = files["annotations.json"]
    assert len(annotations) == 6 and all(1 <= a["preference"] <= 2 for a in annotations)
    assert {a["generator_1"] for a in annotations} == {"reference:tiny"}
    assert files["metrics.json"] == result and list(result) == METRICS_JSON_KEYS
    assert result["win_rate"] == evaluated.scores.win_rate and result["judge"] == evaluated.judge.label
    expected_wr = 100 * sum(a["preference"] - 1 for a in annotations) / len(annotations)
    assert abs(result["win_rate"] - expected_wr) < 1e-9
    assert result["judge"] == "local_logprob:tiny" and result["weak_judge"] is True
    assert result["judge_max_chars"] == 300 and "max_output_chars" not in result
    assert result["eval_set"] == "prefflow_embedded" and result["subset"] is True
    assert result["reference_generator"] == "reference:tiny"
    assert result["lc_method"] == "length_controlled_v1_subset_no_gamed_regularisation_no_instruction_difficulty"
    assert result["length_controlled_winrate"] is None  # 6 instructions: too few for the GLM, and it says so
    assert result["lc_unavailable_reason"].startswith("6 judged instructions")
    prompt_tokens = sum(a["raw_completion"]["prompt_tokens"] for a in annotations if a["raw_completion"])
    assert result["judge_tokens"] == {
        "prompt": prompt_tokens,
        "completion": 0,
        "total": prompt_tokens,
        "n_judgements": sum(a["raw_completion"] is not None for a in annotations),
        "n_without_counts": 0,
    }
    assert result["judge_cost_usd"] is None and result["judge_cost_note"] == "local judge: no per-token price"
    assert result["judge_agreement"] is None and result["heldout_preference"] is None
    expected_settings = {
        "max_new_tokens": 6,
        "temperature": 0.9,
        "top_p": 1.0,
        "seed": 1814,
        "batch_size": 4,
        "do_sample": True,
    }
    assert {k: result["generation"][k] for k in expected_settings} == expected_settings
    assert {k: files["generation.json"][k] for k in expected_settings} == expected_settings
    assert result["n_total"] == 6
    # what produced the row: the eval set as used (its instructions with the reference answers), the judge and
    # its prompt, the decoding settings and dtype, hashed and checked here independently
    provenance = result["provenance"]
    used = json.dumps([[r["instruction"], r["output"]] for r in refs], ensure_ascii=False, separators=(",", ":"))
    assert provenance["eval_set_sha256"] == hashlib.sha256(used.encode("utf-8")).hexdigest()
    assert (provenance["eval_set"], provenance["eval_set_size"]) == ("prefflow_embedded", 6)
    template = Path(evaluated_judge_template(settings))
    assert provenance["annotator_prompt_sha256"] == hashlib.sha256(template.read_bytes()).hexdigest()
    assert (provenance["judge_endpoint"], provenance["judge_model"]) == ("local", "tiny")
    assert provenance["decoding"] == {**expected_settings, "backend": "hf"} and provenance["eval_dtype"] == "float32"
    assert provenance["alpaca_eval_version"] == importlib.metadata.version("alpaca-eval")
    assert evaluated.provenance is not None and evaluated.provenance.as_dict() == provenance
    logged = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("provenance: "))
    assert f"alpaca_eval {provenance['alpaca_eval_version']}, judge local:tiny" in logged
    assert provenance["eval_set_sha256"] in logged and provenance["annotator_prompt_sha256"] in logged

    # a retried step reuses the outputs and the judgements: no policy forward pass, no new cache line
    (cache_file,) = (tmp_path / "cache").glob("*.jsonl")
    cached_lines = cache_file.read_text().count("\n")
    calls = {"n": 0}
    policy.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    again = evaluate_model("tiny", eval_set, refs, settings, context)
    assert calls["n"] == 0 and cache_file.read_text().count("\n") == cached_lines
    assert again == evaluated  # the same outputs, judgements, scores and generation record

    # other settings are other outputs: the policy answers again
    evaluate_model("tiny", eval_set, refs, dataclasses.replace(settings, max_new_tokens=3), context)
    assert calls["n"] > 0


def evaluated_judge_template(settings: EvaluationConfig) -> str:
    """The prompt template file of the annotator config the local judge imitates (alpaca_eval's own constants)."""
    import yaml
    from alpaca_eval import constants

    assert settings.judge.startswith("local_logprob")
    configs = Path(constants.EVALUATORS_CONFIG_DIR)
    with open(configs / "weighted_alpaca_eval_gpt4_turbo" / "configs.yaml", encoding="utf-8") as fh:
        (annotator,) = yaml.safe_load(fh).values()
    return str(configs / annotator["prompt_template"])


def test_reference_outputs_from_the_eval_set(shared_dir):
    eval_set = load_eval_set(str(shared_dir / "alpaca_eval" / "eval_set.json"), max_instructions=3)
    refs = reference_outputs_for(eval_set, "tiny", GenerationSettings())
    assert [r["generator"] for r in refs] == ["gpt4_1106_preview"] * 3
    assert [r["output"] for r in refs] == [r["output"] for r in eval_set.records]


def test_new_user_tiny_run_does_not_crash(tiny_model_factory, tokenizer, tmp_path):
    """The reported crash: ``model.base: tiny``, ``max_new_tokens: 4``, judge tiny, the default 24 instructions.
    Evaluation finishes; LC is None with its reason; the judge's recorded agreement and held-out metrics attach."""
    from steps.evaluate.agreement import record_agreement
    from steps.evaluate.judges import make_judge

    eval_set = load_eval_set("embedded")
    generation = GenerationSettings(max_new_tokens=4, batch_size=8)
    reference_run = ModelRun(model=tiny_model_factory(seed=0), tokenizer=tokenizer, show_progress=False)
    refs = reference_outputs_for(eval_set, "tiny", generation, reference_run)
    registry = tmp_path / "registry.json"
    official = tmp_path / "official.json"
    official.write_text("[]")
    judge = make_judge("local_logprob:tiny", judge_max_chars=300, device="cpu")
    record_agreement({"agreement": 0.5, "n_agree": 1, "n_compared": 2}, judge, official, 2, path=registry)
    pairs = [
        {"prompt": [{"role": "user", "content": q}], "chosen": "Yes.", "rejected": "No, not at all."}
        for q in eval_set.instructions[:3]
    ]
    settings = EvaluationConfig(
        max_new_tokens=4,
        batch_size=8,
        judge="local_logprob:tiny",
        judge_max_chars=300,
        agreement_registry=str(registry),
    )
    run = ModelRun(model=tiny_model_factory(seed=0), tokenizer=tokenizer, show_progress=False)
    evaluated = evaluate_model(
        "tiny", eval_set, refs, settings, EvalContext(generator="tiny-sft", out_dir=tmp_path / "eval", run=run)
    )
    scores = evaluated.scores
    assert scores.n_total == 24 and scores.win_rate is not None and 0 <= scores.win_rate <= 100
    assert scores.length_controlled_winrate is None
    assert (scores.lc_unavailable_reason or "").startswith("24 judged instructions")
    agreement = evaluated.judge.agreement
    assert agreement is not None and agreement["agreement"] == 0.5 and agreement["limit"] == 2
    # the held-out metrics are the evaluate step's (steps.pipeline.heldout_metrics), written into metrics.json
    held = heldout_preference_metrics(
        "tiny",
        pairs,
        HeldoutScoring(max_seq_len=256, overlength="truncate", mask_source_tokens=True, beta=0.1),
        run,
        reference="tiny",
    )
    assert held.n_pairs == 3 and held.reference == "tiny" and held.preference_accuracy is not None
    assert 0 <= held.preference_accuracy <= 1
    # the policy is its own reference here (tiny, seed 0): every implicit reward margin is exactly 0
    assert held.reward_margin_mean == 0.0 and held.reward_accuracy == 0.0
    write_metrics(evaluated, held)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["lc_unavailable_reason"] == scores.lc_unavailable_reason
    assert written["heldout_preference"] == held.as_dict() and list(written) == METRICS_JSON_KEYS
