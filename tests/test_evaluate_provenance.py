"""Rows you can reproduce (steps/evaluate/provenance.py): what each judge kind records (prompt hashes checked against
hashlib on the installed alpaca_eval's files), the join's paired Δ refusing rows whose provenance differs (another
judge, another alpaca_eval version, none recorded) while identical provenance pairs with the same numbers, the
report's provenance columns, and older pickled results loading without one."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import math
import pickle
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from steps.config import EvaluationConfig
from steps.evaluate.judges import make_judge
from steps.evaluate.paired import paired_comparison
from steps.evaluate.provenance import UNCOMPARED, Provenance, build_provenance, pairing_refusal
from steps.io import read_json, write_json
from steps.report import RunRecord, Selection, render_report
from steps.report.rows import rows_for_run
from steps.report.table import COLUMNS
from tests.eval_results import alpaca_eval_result, legacy_dict, provenance, variant_result

OFFICIAL = "weighted_alpaca_eval_gpt4_turbo"
SERVED = {"judge_base_url": "http://127.0.0.1:9/v1"}


def _official_prompt_file() -> Path:
    """The official annotator's prompt template, found from alpaca_eval's own constants and its configs.yaml."""
    from alpaca_eval import constants

    configs_dir = Path(constants.EVALUATORS_CONFIG_DIR)
    with open(configs_dir / OFFICIAL / "configs.yaml", encoding="utf-8") as fh:
        (settings,) = yaml.safe_load(fh).values()
    return configs_dir / settings["prompt_template"]


def _eval_set(n: int = 3) -> tuple[list[str], list[dict]]:
    instructions = [f"Question {i}: name a colour. ü" for i in range(n)]
    return instructions, [
        {"instruction": q, "output": f"Blue {i}", "generator": "ref"} for i, q in enumerate(instructions)
    ]


GENERATION = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.95, "seed": 3, "batch_size": 2, "do_sample": True}


def test_each_judge_kind_records_its_endpoint_model_and_prompt_hash():
    prompt_sha = hashlib.sha256(_official_prompt_file().read_bytes()).hexdigest()
    instructions, refs = _eval_set()
    expected_set_sha = hashlib.sha256(
        (
            '[["Question 0: name a colour. ü","Blue 0"],["Question 1: name a colour. ü","Blue 1"],'
            '["Question 2: name a colour. ü","Blue 2"]]'
        ).encode()
    ).hexdigest()
    generation = {**GENERATION, "backend": "hf", "dtype": "bfloat16", "process": "in_process", "seconds": 1.5}

    local = build_provenance(
        make_judge("local_logprob:tiny", judge_max_chars=300, device="cpu"), "colours", instructions, refs, generation
    )
    assert (local.judge_endpoint, local.judge_model, local.judge) == ("local", "tiny", "local:tiny")
    assert local.annotator_config == OFFICIAL and local.annotator_prompt_sha256 == prompt_sha
    assert (
        local.judge_settings
        == "local_logprob:tiny|template=weighted_alpaca_eval_gpt4_turbo|max_output_chars=300|switch_seed=0|seed=0"
    )
    assert (local.eval_set, local.eval_set_size, local.eval_set_sha256) == ("colours", 3, expected_set_sha)
    assert local.decoding == {**GENERATION, "backend": "hf"}  # speed and process are not decoding settings
    assert local.eval_dtype == "bfloat16"
    assert local.alpaca_eval_version == importlib.metadata.version("alpaca-eval") == "0.6.6"
    import torch
    import transformers

    assert local.software_versions == {
        "prefflow": importlib.metadata.version("prefflow"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    assert local.benchmark_versions.get("lm_eval") == importlib.metadata.version("lm_eval")
    assert "nvidia-ifbench" not in local.benchmark_versions or local.benchmark_versions["nvidia-ifbench"]

    served = build_provenance(
        make_judge("openai_compatible:gpt-4o", **SERVED), "colours", instructions, refs, generation
    )
    assert (served.judge, served.annotator_prompt_sha256) == ("served:gpt-4o", prompt_sha)  # the same prompt sent

    annotator = build_provenance(make_judge(f"alpaca_eval:{OFFICIAL}"), "colours", instructions, refs, generation)
    assert (annotator.judge, annotator.annotator_config) == ("alpaca_eval:gpt-4-1106-preview", OFFICIAL)
    assert annotator.annotator_prompt_sha256 == prompt_sha and annotator.judge_settings == f"alpaca_eval:{OFFICIAL}"

    other_refs = [dict(r, output=r["output"] + ".") for r in refs]
    assert (
        build_provenance(
            make_judge("local_logprob:tiny", device="cpu"), "colours", instructions, other_refs, generation
        ).eval_set_sha256
        != expected_set_sha
    )
    assert Provenance.from_dict(json.loads(json.dumps(local.as_dict()))) == local


def test_every_field_but_the_software_versions_stops_pairing():
    base = provenance()
    for field in dataclasses.fields(Provenance):
        value = getattr(base, field.name)
        changed = {**value, "x": "1"} if isinstance(value, dict) else 25 if isinstance(value, int) else "other"
        refusal = pairing_refusal(dataclasses.replace(base, **{field.name: changed}), base, "sft")
        assert (refusal is None) is (field.name in UNCOMPARED), field.name
    assert UNCOMPARED == ("software_versions",)


def test_pairing_refusal_names_what_differs():
    base = provenance()
    assert pairing_refusal(provenance(), base, "sft") is None
    assert pairing_refusal(provenance(software_versions={"torch": "2.11.0"}), base, "sft") is None  # not compared
    assert pairing_refusal(None, None, "sft") is None  # two older rows pair as before
    assert pairing_refusal(None, base, "sft") == (
        "not paired with sft: this row has no provenance record (evaluated before it was recorded)"
    )
    assert pairing_refusal(base, None, "sft") == (
        "not paired with sft: baseline sft has no provenance record (evaluated before it was recorded)"
    )
    served = provenance(judge_endpoint="served", judge_model="gpt-4o", judge_settings="openai_compatible:gpt-4o")
    assert pairing_refusal(served, base, "sft") == "not paired with sft: judge differs (served:gpt-4o vs local:tiny)"
    assert pairing_refusal(provenance(judge_settings="x"), base, "sft") == (
        f"not paired with sft: judge settings differ (x vs {base.judge_settings})"
    )
    several = provenance(
        alpaca_eval_version="0.6.2",
        eval_set_sha256="ef" * 32,
        decoding={**base.decoding, "temperature": 0.7},
        eval_dtype="bfloat16",
        benchmark_versions={},
    )
    assert pairing_refusal(several, base, "sft") == (
        "not paired with sft: alpaca_eval version differs (0.6.2 vs 0.6.6); evaluation dtype differs (bfloat16 vs "
        "float32); eval set differs (prefflow_embedded, 24 instructions, sha256 efefefefefef vs prefflow_embedded, "
        "24 instructions, sha256 cdcdcdcdcdcd); decoding differs (temperature 0.7 vs 0.9); benchmark versions "
        "differ (lm_eval none vs 0.4.13)"
    )


def _annotations(path: Path, preferences: list[float]) -> str:
    rows = [
        {"instruction": f"q{i}", "output_1": f"ref{i}", "output_2": f"ans{i}", "preference": p, "generator_1": "r"}
        for i, p in enumerate(preferences)
    ]
    write_json(path, rows)
    return str(path)


def _join_rows(tmp_path: Path):
    """sft (baseline), dpo (same provenance), simpo (a served judge), orpo (alpaca_eval 0.6.2), ipo (none recorded)."""
    preferences = {
        "sft": [1.0, 1.5, 1.0, 2.0],
        "dpo": [2.0, 1.75, 1.0, 2.0],
        "simpo": [2.0, 2.0, 2.0, 2.0],
        "orpo": [1.0, 1.0, 2.0, 2.0],
        "ipo": [2.0, 2.0, 1.0, 1.0],
    }
    served = provenance(judge_endpoint="served", judge_model="gpt-4o", judge_settings="openai_compatible:gpt-4o")
    recorded = {
        "sft": provenance(),
        "dpo": provenance(software_versions={"torch": "2.11.0+cu130"}),  # recorded, not compared
        "simpo": served,
        "orpo": provenance(alpaca_eval_version="0.6.2"),
        "ipo": None,
    }
    return [
        variant_result(v, alpaca_eval_result(_annotations(tmp_path / f"{v}.json", p), provenance=recorded[v]))
        for v, p in preferences.items()
    ]


def test_the_join_pairs_only_rows_with_the_baselines_provenance(tmp_path):
    from steps.pipeline import _add_paired

    config = EvaluationConfig(paired_resamples=300)
    sft, dpo, simpo, orpo, ipo = _add_paired(_join_rows(tmp_path), config)
    assert sft.paired_vs is not None and sft.paired_vs.is_baseline
    # identical provenance (torch aside) pairs as before: the numbers of paired_comparison itself
    assert dpo.paired_vs is not None and dpo.paired_vs.unavailable is None
    expected = paired_comparison(
        read_json(tmp_path / "dpo.json"), read_json(tmp_path / "sft.json"), seed=0, resamples=300
    )
    assert dpo.paired_vs.comparison == expected
    assert dpo.paired_vs.comparison["paired_delta_wr"] == pytest.approx((1.0 + 0.25 + 0 + 0) / 4 * 100)
    for row, why in (
        (simpo, "judge differs (served:gpt-4o vs local:tiny)"),
        (orpo, "alpaca_eval version differs (0.6.2 vs 0.6.6)"),
        (ipo, "this row has no provenance record (evaluated before it was recorded)"),
    ):
        assert row.paired_vs is not None and row.paired_vs.comparison is None, row.variant
        assert row.paired_vs.unavailable == f"not paired with sft: {why}"

    # the report: Δ n/a with a footnote saying why; the provenance in CSV/JSON, the Markdown columns unchanged
    record = RunRecord(
        "PrefFlow", "7", datetime(2026, 1, 2, tzinfo=timezone.utc), [], [], True, [sft, dpo, simpo, orpo, ipo]
    )
    files, _ = render_report([record], Selection())
    table = files["results.md"].decode()
    header = next(line for line in table.splitlines() if line.startswith("| LC WR"))
    assert header == "| " + " | ".join(COLUMNS) + " |"
    cells = {line.split(" | ")[2]: line.split(" | ")[6] for line in table.splitlines() if line.startswith("| n/a")}
    assert cells["DPO"].startswith("+31.25 [")
    assert (cells["IPO"], cells["ORPO"], cells["SimPO"]) == ("n/a [p1]", "n/a [p2]", "n/a [p3]")  # table order
    assert "[p2] Δ WR n/a: not paired with sft: alpaca_eval version differs (0.6.2 vs 0.6.6)" in table
    assert "[p3] Δ WR n/a: not paired with sft: judge differs (served:gpt-4o vs local:tiny)" in table
    rows = {r["variant"]: r for r in json.loads(files["results.json"])["rows"]}
    assert rows["simpo"]["judge_endpoint"] == "served" and rows["simpo"]["judge_model"] == "gpt-4o"
    assert rows["orpo"]["alpaca_eval_version"] == "0.6.2" and rows["ipo"]["alpaca_eval_version"] is None
    assert rows["sft"]["decoding"] == provenance().decoding and rows["sft"]["eval_set_sha256"] == "cd" * 32
    assert rows["orpo"]["paired_unavailable_reason"] == orpo.paired_vs.unavailable
    csv_rows = {r["variant"]: r for r in csv.DictReader(io.StringIO(files["results.csv"].decode()))}
    assert json.loads(csv_rows["sft"]["decoding"]) == provenance().decoding
    assert json.loads(csv_rows["dpo"]["software_versions"]) == {"torch": "2.11.0+cu130"}
    assert csv_rows["ipo"]["judge_endpoint"] == "" and csv_rows["dpo"]["paired_unavailable_reason"] == ""


def test_typed_and_legacy_rows_with_provenance_give_the_same_report():
    rows = [
        variant_result("sft", alpaca_eval_result(provenance=provenance())),
        variant_result("dpo", alpaca_eval_result(provenance=provenance(judge_model="other"))),
    ]

    def record(results):
        return RunRecord("PrefFlow", "8", datetime(2026, 1, 3, tzinfo=timezone.utc), [], [], True, results)

    typed, _ = render_report([record(rows)], Selection())
    legacy, _ = render_report([record([legacy_dict(r) for r in rows])], Selection())
    assert typed == legacy
    assert rows_for_run(record([legacy_dict(r) for r in rows]))[1].judge_model == "other"
    malformed = dict(legacy_dict(rows[0]), provenance={"alpaca_eval_version": "0.6.6"})
    assert rows_for_run(record([malformed]))[0].alpaca_eval_version is None  # incomplete: treated as absent


def test_results_pickled_before_provenance_load_with_none():
    """An artifact written by the code before the field existed: its pickled state has no 'provenance'."""
    old = alpaca_eval_result()
    object.__delattr__(old, "provenance")  # the instance as the old class built it
    data = pickle.dumps(variant_result("dpo", old))
    assert b"provenance" not in data
    loaded = pickle.loads(data)
    assert loaded.evaluation.alpaca_eval.provenance is None
    assert loaded.evaluation.metrics()["provenance"] is None
    assert math.isclose(loaded.evaluation.alpaca_eval.scores.win_rate, 45.41)
    assert dataclasses.replace(loaded.evaluation.alpaca_eval, provenance=provenance()).provenance == provenance()
