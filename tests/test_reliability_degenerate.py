"""Degenerate models end to end (real tiny models, the real judge, alpaca_eval scoring, the report): empty answers,
answers identical to the reference, a judge that ties every pair, one instruction. Evaluation and the report finish
and say what happened: exact win rates, LC n/a with its reason, no NaN anywhere, strict JSON."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from steps.config import EvaluationConfig
from steps.evaluate import (
    EvalContext,
    GenerationSettings,
    ModelRun,
    evaluate_model,
    load_eval_set,
    reference_outputs_for,
)
from steps.report import RunRecord, Selection, write_report
from tests.eval_results import variant_result
from tests.test_report import table_cells

GREEDY = GenerationSettings(max_new_tokens=4, temperature=0.0, batch_size=3)
SAMPLED = GenerationSettings(max_new_tokens=4, temperature=0.9, seed=7, batch_size=3)


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    """``other``: a tiny model whose answers differ from the reference's; ``silent``: its final norm zeroed, so
    every logit is 0: greedy decoding emits token 0 (a special token) and answers are empty, and as a judge it
    gives "m" and "M" the same probability, so every judged pair is an exact tie."""
    import torch

    from steps.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("degenerate")
    tokenizer = load_tokenizer("tiny")
    other = _save(load_model("tiny", seed=11), tokenizer, root / "other")
    silent_model = load_model("tiny", seed=0)
    with torch.no_grad():
        silent_model.model.norm.weight.zero_()
    silent = _save(silent_model, tokenizer, root / "silent")
    return {"tiny": "tiny", "other": other, "silent": silent}


CASES = {
    # case: (model, its decoding, judge, instructions); the reference is the eval set's own answers, except for
    # identical_answers, where it is the tiny model's own sampled answers (the model then repeats them exactly)
    "empty_answers": ("silent", GREEDY, "tiny", 3),
    "identical_answers": ("tiny", SAMPLED, "tiny", 3),
    "all_ties": ("other", SAMPLED, "silent", 3),
    "one_instruction": ("other", SAMPLED, "tiny", 1),
}


def _eval_set(case: str, n: int, tmp_path: Path):
    """The embedded instructions; with written reference answers (as AlpacaEval ships its baseline's)."""
    embedded = load_eval_set("embedded", max_instructions=n)
    if case == "identical_answers":
        return embedded
    records = [
        {"instruction": q, "output": f"A short reference answer to question {i}.", "generator": "ref", "dataset": "t"}
        for i, q in enumerate(embedded.instructions)
    ]
    path = tmp_path / "eval_set.json"
    path.write_text(json.dumps(records))
    return load_eval_set(str(path))


def _strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


@pytest.mark.parametrize("case", sorted(CASES))
def test_degenerate_model_evaluates_and_reports_honestly(case, specs, tmp_path):
    model, decoding, judge, n = CASES[case]
    eval_set = _eval_set(case, n, tmp_path)
    reference = reference_outputs_for(eval_set, "tiny", SAMPLED, ModelRun(show_progress=False))
    settings = EvaluationConfig(
        **{k: getattr(decoding, k) for k in ("max_new_tokens", "temperature", "top_p", "seed", "batch_size")},
        judge="local_logprob",
        judge_model=specs[judge],
        agreement_registry=str(tmp_path / "none.json"),
    )
    context = EvalContext(case, tmp_path / "eval", ModelRun(show_progress=False), cache_dir=tmp_path / "judge_cache")
    evaluated = evaluate_model(specs[model], eval_set, reference, settings, context)
    result = evaluated.metrics_json()
    outputs = json.loads((tmp_path / "eval" / "model_outputs.json").read_text())
    annotations = json.loads((tmp_path / "eval" / "annotations.json").read_text())
    prefs = [a["preference"] for a in annotations]
    assert len(outputs) == len(annotations) == result["n_total"] == n
    # the win rate recomputed from the judgements by AlpacaEval's definition, not read from the code's output
    assert result["win_rate"] == pytest.approx(100 * sum(p - 1 for p in prefs) / n, abs=1e-9)
    if case == "empty_answers":
        assert [o["output"] for o in outputs] == [""] * n and result["avg_length"] == 0
        assert all(a["raw_completion"] is not None for a in annotations)  # empty answers are still judged
    if case == "identical_answers":
        assert [o["output"] for o in outputs] == [r["output"] for r in reference] and all(o["output"] for o in outputs)
        assert prefs == [1.5] * n and all(a["raw_completion"] is None for a in annotations)  # no judge call
        assert not list((tmp_path / "judge_cache").glob("*.jsonl"))
    if case == "all_ties":
        assert [o["output"] for o in outputs] != [r["output"] for r in reference]
        assert prefs == [1.5] * n and all(a["raw_completion"] is not None for a in annotations)  # judged ties
    if case in ("identical_answers", "all_ties"):
        assert result["win_rate"] == 50.0 and result["standard_error"] == 0.0
    if case == "one_instruction":
        assert result["standard_error"] is None  # one judgement has no standard error: not shown as 0
    assert result["length_controlled_winrate"] is None and "at least 50" in result["lc_unavailable_reason"]
    _strict_json((tmp_path / "eval" / "metrics.json").read_text())

    row = variant_result("sft", evaluated, model_dir=specs[model], training_config={"lr": 1e-3, "epochs": 1})
    record = RunRecord(
        flow="PrefFlow",
        run_id="1800000000000001",
        created_at=datetime(2026, 1, 2, tzinfo=timezone.utc),
        tags=[],
        system_tags=[],
        successful=True,
        results=[row],
        run_config={"name": case},
        training_curves={},
    )
    paths = write_report([record], Selection(), tmp_path / "reports")
    texts = {p.name: p.read_text() for p in (paths.results_md, paths.results_csv, paths.results_json, paths.readme)}
    for name, text in texts.items():
        assert not re.search(r"\b(nan|NaN|inf|Infinity|None)\b", text), f"{name} shows a non-number"
    rows = _strict_json(texts["results.json"])["rows"]
    assert len(rows) == 1 and rows[0]["winrate"] == pytest.approx(result["win_rate"])
    assert rows[0]["lc_winrate"] is None
    header, _, cells = table_cells(texts["results.md"])[:3]
    wr_cell, lc_cell = cells[header.index("WR")], cells[header.index("LC WR")]
    se = result["standard_error"]
    assert wr_cell == f"{result['win_rate']:.2f}" + (f" ± {se:.2f}" if se is not None else "")
    assert lc_cell.startswith("n/a")
    assert "at least 50" in texts["results.md"]  # the footnote says why LC is missing
