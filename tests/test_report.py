"""Results report: table and plots on hand-built records, then the Client-API path on real Metaflow runs.

The Metaflow part runs a small throwaway flow (no training) that stores artifacts shaped like
flows/pipeline.py's and ends with the same ``report`` step the pipeline has, then regenerates the
report from those runs with filters, from the command line, and from two processes at once.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from steps.report import ReportError, RunRecord, Selection, generate_report, render_report, write_report
from steps.report.plots import training_curves_png, training_panels, win_rate_bars_png
from steps.report.records import TrainingCurves, client_scope
from steps.report.table import COLUMNS, build_rows, markdown_table, results_csv

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED = ["LC WR", "WR", "Loss Function", "Training Config", "Epoch", "Model Initialization"]


# ----------------------------------------------------------------------------- hand-built records


def _history(n: int, preference: bool) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "loss": 2.0 / s, "lr": 1e-5}
        if preference:
            row.update(reward_margin=0.05 * s, reward_accuracy=min(1.0, 0.2 * s))
        rows.append(row)
    return rows


def make_record(
    run_id: str = "1700000000000001",
    day: int = 3,
    lc: float | None = 33.456,
    wr: float | None = 30.004,
    extra_result: dict | None = None,
) -> RunRecord:
    base = "embedded:smollm2-135m-instruct"
    sft_dir = f"/runs/PrefFlow/{run_id}/sft/model"
    sft = {
        "variant": "sft",
        "model_dir": sft_dir,
        "init": base,
        "epoch": 1,
        "evaluated": True,
        "win_rate": 12.5,
        "standard_error": 2.25,
        "length_controlled_winrate": 14.0,
        "lc_standard_error": 1.0,
        "n_total": 16,
        "avg_length": 321,
        "lc_method": "length_controlled_v1_minimal_no_instruction_difficulty",
        "judge": "local_logprob:embedded:smollm2-135m-instruct",
        "eval_set": "embedded",
        "reference_generator": base,
        "training_config": {"lr": 2e-5, "epochs": 1},
    }
    dpo = {
        "variant": "dpo",
        "model_dir": f"/runs/PrefFlow/{run_id}/dpo/model",
        "init": sft_dir,
        "epoch": 2,
        "evaluated": True,
        "win_rate": wr,
        "standard_error": 1.5,
        "length_controlled_winrate": lc,
        "lc_standard_error": 0.75,
        "n_total": 805,
        "avg_length": 1500,
        "lc_method": "length_controlled_v1 (approximate assets: ../shared/alpaca_eval/lc_assets_reconstructed)",
        "judge": "alpaca_eval:weighted_alpaca_eval_gpt4_turbo",
        "eval_set": "alpaca_eval",
        "reference_generator": "gpt4_1106_preview",
        "training_config": {
            "lr": 5e-7,
            "criterion_config": {"_type_": "steps.losses.dpo.DPOConfig", "beta": 0.1, "nll_scale": 0.0},
        },
    }
    results = [dpo, sft] + ([extra_result] if extra_result else [])  # deliberately not in display order
    return RunRecord(
        flow="PrefFlow",
        run_id=run_id,
        created_at=datetime(2025, 1, day, 12, tzinfo=timezone.utc),
        tags=["sweep"],
        system_tags=["user:prefflow"],
        successful=True,
        results=results,
        run_config={"name": "t", "model": {"base": base}},
        training_curves={
            "sft": TrainingCurves(_history(5, False), [{"step": 5, "dev_loss": 0.5}]),
            "dpo": TrainingCurves(
                _history(4, True), [{"step": 4, "dev_loss": 0.6, "dev_reward_margin": 0.1, "dev_reward_accuracy": 0.5}]
            ),
        },
    )


def table_cells(markdown: str) -> list[list[str]]:
    """Split a Markdown table (header, separator, rows) into cells."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


def test_table_has_documented_columns_and_values():
    record = make_record()
    cells = table_cells(markdown_table(build_rows([record])))
    header, sep, sft, dpo = cells
    assert header[:6] == DOCUMENTED
    assert header == COLUMNS
    assert COLUMNS[6:] == [
        "Δ WR vs Baseline [95% CI]",
        "Held-out Pref. Acc.",
        "Judge",
        "Judge Agreement",
        "Judge Tokens / Cost",
        "Eval Set",
        "Reference",
        "LC Method",
        "n",
        "Date",
        "Run",
        "IFBench (strict, prompt) ± s.e.",
        "Δ IFBench vs Baseline [95% CI]",
    ]
    assert len(sep) == 1 and sep[0].count("---") == len(COLUMNS)
    # SFT first; numbers rounded to 2 decimals (33.456 -> 33.46, 30.004 -> 30.00), each with its standard error
    assert sft[:3] == ["14.00 ± 1.00", "12.50 ± 2.25", "SFT"]
    assert dpo[:3] == ["33.46 ± 0.75", "30.00 ± 1.50", "DPO"]
    assert dpo[3] == "[lr=5e-07, beta=0.1, nll_scale=0](configs/PrefFlow-1700000000000001-dpo.yaml)"
    assert dpo[4] == "2"
    assert dpo[5] == "SFT (from embedded:smollm2-135m-instruct)"  # init is the SFT row's model_dir
    assert sft[5] == "embedded:smollm2-135m-instruct"
    assert dpo[6:8] == ["n/a", "n/a"]  # no paired comparison, no held-out metrics in these records
    assert dpo[8:10] == ["alpaca_eval:weighted_alpaca_eval_gpt4_turbo", "not measured"]
    assert dpo[11:16] == [
        "alpaca_eval",
        "gpt4_1106_preview",
        "length_controlled_v1 (approximate assets: ../shared/alpaca_eval/lc_assets_reconstructed)",
        "805",
        "2025-01-03",
    ]
    assert dpo[16:] == ["`PrefFlow/1700000000000001`", "n/a", "n/a"]  # an older run's row: no IFBench
    assert len(sft) == len(dpo) == len(COLUMNS)


def test_uncertainty_paired_heldout_agreement_and_cost_cells():
    trusted = {
        "variant": "simpo",
        "evaluated": True,
        "win_rate": 40.0,
        "standard_error": 1.7,
        "length_controlled_winrate": None,
        "lc_standard_error": None,
        "lc_unavailable_reason": "24 judged instructions; the GLM needs at least 50",
        "judge": "openai_compatible:meta-llama/Llama-3.1-70B-Instruct",
        "paired_vs": {
            "baseline": "sft",
            "paired_delta_wr": 2.206,
            "paired_ci95": [0.97, 3.47],
            "distinguishable": True,
        },
        "heldout_preference": {
            "preference_accuracy": 0.625,
            "preference_accuracy_normalized": 0.5,
            "reward_accuracy": 0.875,
            "reward_margin_mean": 0.3141,
        },
        "judge_agreement": {
            "n_agree": 16,
            "n_compared": 30,
            "agreement": 16 / 30,
            "majority_baseline_agreement": 29 / 30,
            "cohens_kappa": 0.07,
            "official_annotator": "weighted_alpaca_eval_gpt4_turbo",
        },
        "judge_tokens": {"total": 1_234_567},
        "judge_cost_usd": 12.0561,
    }
    noisy = {
        "variant": "orpo",
        "evaluated": True,
        "win_rate": 12.0,
        "judge": "local_logprob:tiny",
        "lc_unavailable_reason": "every judgement is a tie",
        "paired_vs": {
            "baseline": "sft",
            "paired_delta_wr": -0.5,
            "paired_ci95": [-1.25, 0.25],
            "distinguishable": False,
        },
        "judge_tokens": {"total": 4200},
    }
    record = make_record(extra_result=trusted)
    record.results.append(noisy)
    table = markdown_table(build_rows([record]))
    cells = {row[2]: row for row in table_cells(table)[2:]}
    simpo, orpo = cells["SimPO"], cells["ORPO"]
    # footnotes are numbered in table order: SFT, DPO, ORPO, SimPO
    assert orpo[0] == "n/a [1]" and simpo[:2] == ["n/a [2]", "40.00 ± 1.70"]
    assert "[1] LC WR n/a: every judgement is a tie" in table
    assert "[2] LC WR n/a: 24 judged instructions; the GLM needs at least 50" in table
    assert simpo[6] == "+2.21 [+0.97, +3.47] vs SFT"
    assert orpo[6] == "-0.50 [-1.25, +0.25] vs SFT: not distinguishable from SFT"
    assert cells["SFT"][6] == "n/a"  # an older record: no comparison stored
    record.results[1]["paired_vs"] = {"baseline": "sft", "is_baseline": True}
    assert table_cells(markdown_table(build_rows([record])))[2][6] == "— (baseline)"
    assert simpo[7] == "0.62 (per token 0.50; reward 0.88, margin 0.314)"
    assert simpo[9] == "16/30 (53%; majority 97%; κ 0.07) vs weighted_alpaca_eval_gpt4_turbo"
    assert simpo[10] == "1.2M / $12.06" and orpo[10] == "4k / local"


def test_n_says_how_many_judgements_parsed_of_those_evaluated():
    """alpaca_eval's n_total counts only judgements that parsed as a preference; the rest are not in WR."""
    record = make_record()
    sft, dpo = sorted(record.results, key=lambda r: r["variant"] != "sft")
    sft.update(n_total=15, n_instructions=16)  # one judgement of 16 did not parse
    dpo.update(n_instructions=805)  # all judged: the plain count
    rows = table_cells(markdown_table(build_rows([record])))[2:]
    column = COLUMNS.index("n")
    assert [row[column] for row in rows] == ["15 of 16 judged", "805"]
    exported = list(csv.DictReader(io.StringIO(results_csv(build_rows([record])))))
    assert [(r["n"], r["n_instructions"]) for r in exported] == [("15", "16"), ("805", "805")]


def test_missing_keys_print_na_and_pipes_are_escaped():
    bare = {"variant": "simpo"}  # an old or partial record: nothing but the variant
    odd = {
        "variant": "orpo",
        "evaluated": True,
        "win_rate": float("nan"),
        "judge": "a|b",
        "training_config": {"lr": 8e-6},
    }
    record = make_record(lc=None, extra_result=bare)
    record.results.append(odd)
    cells = {row[2]: row for row in table_cells(markdown_table(build_rows([record])))[2:]}
    assert cells["SimPO"][:2] == ["n/a", "n/a"] and cells["SimPO"][3].startswith("[n/a](")
    assert cells["SimPO"][4:15] == ["n/a"] * 11  # not evaluated: no "not measured" either
    assert cells["DPO"][0] == "n/a" and cells["DPO"][1] == "30.00 ± 1.50"
    assert cells["ORPO"][1] == "n/a"  # NaN is not a number to print
    assert cells["ORPO"][8] == "a\\|b"
    assert [row[2] for row in table_cells(markdown_table(build_rows([record])))[2:]] == ["SFT", "DPO", "ORPO", "SimPO"]


def test_results_markdown_states_selection_and_caveats_without_wall_clock():
    files, _ = render_report([make_record()], Selection(tags=("sweep",), latest=3))
    text = files["results.md"].decode()
    assert "tags `sweep`" in text and "latest 3 successful runs" in text and "1 run, 2 models" in text
    assert "smoke test" in text  # a local_logprob judge row is present
    assert "approximate" in text  # reconstructed LC assets are labelled
    assert text.count("| SFT |") == 1 and text.count("| DPO |") == 1
    assert str(datetime.now().year) not in text.replace("2025-01-03", "")  # no generation timestamp


def test_csv_and_json_exports_carry_standard_errors():
    files, _ = render_report([make_record()], Selection())
    rows = list(csv.DictReader(io.StringIO(files["results.csv"].decode())))
    assert [r["variant"] for r in rows] == ["sft", "dpo"]
    assert float(rows[1]["lc_winrate"]) == 33.456 and float(rows[1]["lc_standard_error"]) == 0.75
    assert float(rows[0]["standard_error"]) == 2.25 and rows[0]["run_id"] == "1700000000000001"
    doc = json.loads(files["results.json"])
    assert doc["columns"][:6] == DOCUMENTED
    assert doc["rows"][1]["winrate"] == 30.004 and doc["rows"][1]["n"] == 805
    assert doc["runs"][0]["pathspec"] == "PrefFlow/1700000000000001"


def test_paths_are_relative_to_the_runs_output_root():
    """model_dir as the run's output root sees it, and the root as the run's config names it: a report made on one
    machine reads the same on any other; a path outside the root (or a run recorded without one) stays as it was."""
    machine = "/scratch/alice/work/runs/PrefFlow/1700000000000001"
    record = make_record(extra_result={"variant": "orpo", "model_dir": "/elsewhere/orpo/final", "evaluated": False})
    for result in record.results:
        for key in set(result) & {"model_dir", "init"}:
            result[key] = result[key].replace("/runs/PrefFlow/1700000000000001", machine)
    dpo_init = next(r["init"] for r in record.results if r["variant"] == "dpo")
    record.output_root, record.run_config = machine, {"resources": {"output_dir": "runs"}}
    unresolved = make_record(run_id="1700000000000002", day=4)
    files, _ = render_report([record, unresolved], Selection())
    doc = json.loads(files["results.json"])
    assert [(r["variant"], r["model_dir"]) for r in doc["rows"]] == [
        ("sft", "sft/model"),
        ("dpo", "dpo/model"),
        ("orpo", "/elsewhere/orpo/final"),
        ("sft", "/runs/PrefFlow/1700000000000002/sft/model"),
        ("dpo", "/runs/PrefFlow/1700000000000002/dpo/model"),
    ]
    assert [r["output_root"] for r in doc["runs"]] == ["runs/PrefFlow/1700000000000001", None]
    assert dpo_init == f"{machine}/sft/model" and doc["rows"][1]["model_initialization"].startswith("SFT (from ")
    assert machine not in files["results.json"].decode() + files["results.csv"].decode()


def test_config_snapshot_is_the_runs_training_config():
    files, _ = render_report([make_record()], Selection())
    snap = yaml.safe_load(files["configs/PrefFlow-1700000000000001-dpo.yaml"])
    assert snap["training_config"]["lr"] == 5e-7
    assert snap["training_config"]["criterion_config"]["beta"] == 0.1
    assert snap["run_config"] == {"name": "t", "model": {"base": "embedded:smollm2-135m-instruct"}}
    assert (snap["flow"], snap["run_id"], snap["variant"]) == ("PrefFlow", "1700000000000001", "dpo")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_training_plot_panels_and_image():
    record = make_record()
    panels = training_panels(record)
    assert [(key, title, [label for label, _ in series]) for key, title, series in panels] == [
        ("loss", "SFT loss", ["SFT"]),
        ("loss", "preference loss", ["DPO"]),
        ("reward_margin", "reward margin", ["DPO"]),
        ("reward_accuracy", "reward accuracy", ["DPO"]),
    ]
    width, height = _png_size(training_curves_png(record))
    assert (width, height) == (4 * 400, 330)  # 4 panels x 4.0 in x 100 dpi, 3.3 in high
    record.training_curves = {}
    assert training_curves_png(record) is None


def test_win_rate_bars_only_for_scored_rows():
    rows = build_rows([make_record(), make_record(run_id="1700000000000002", day=4)])
    width, _ = _png_size(win_rate_bars_png(rows))
    assert width == int((1.1 * 4 + 2.0) * 100)
    unscored = build_rows([make_record(lc=None, wr=None)])[1:]
    assert win_rate_bars_png(unscored) is None


def test_write_report_is_idempotent_and_drops_stale_files(tmp_path):
    first, second = make_record(), make_record(run_id="1700000000000002", day=4)
    paths = write_report([first, second], Selection(), tmp_path)
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in snapshot}
    assert {p.name for p in paths.config_snapshots} == {
        "PrefFlow-1700000000000001-sft.yaml",
        "PrefFlow-1700000000000001-dpo.yaml",
        "PrefFlow-1700000000000002-sft.yaml",
        "PrefFlow-1700000000000002-dpo.yaml",
    }
    readme = paths.readme.read_text()
    assert "](plots/win_rates.png)" in readme and "](plots/training-PrefFlow-1700000000000002.png)" in readme
    write_report([first, second], Selection(), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot
    assert {p: p.stat().st_mtime_ns for p in snapshot} == mtimes  # unchanged files are not rewritten
    write_report([second], Selection(), tmp_path)
    left = sorted(p.name for p in (tmp_path / "configs").iterdir()) + sorted(
        p.name for p in (tmp_path / "plots").iterdir()
    )
    assert left == [
        "PrefFlow-1700000000000002-dpo.yaml",
        "PrefFlow-1700000000000002-sft.yaml",
        "training-PrefFlow-1700000000000002.png",
        "win_rates.png",
    ]
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------- real Metaflow runs

SHAPE_FLOW = '''
from metaflow import FlowSpec, Parameter, card, current, project, step


@project(name="prefflow_report_test")
class PrefFlow(FlowSpec):
    """Artifacts shaped like flows/pipeline.py's (no training), ending with the pipeline's report step; train_summary
    is the plain dict runs stored before training results were typed (the report reads both)."""

    lc = Parameter("lc", type=float, default=40.0)
    fail_at_end = Parameter("fail_at_end", type=bool, default=False)
    typed = Parameter("typed", type=bool, default=False)  # results as flows/pipeline.py stores them now, else as before

    @step
    def start(self):
        self.variants = [{"name": n, "loss": n, "overrides": {}} for n in ("sft", "dpo")]  # as flows/pipeline.py
        self.run_config = {"name": "shape", "model": {"base": "embedded:tiny"},
                           "preference": {"criterion": "dpo", "lr": 5.0e-6}}
        self.next(self.preference, foreach="variants")

    @step
    def preference(self):
        self.variant = self.input
        name = self.variant["name"]
        history = [{"step": s, "loss": 1.0 / s, "lr": 1e-5} for s in range(1, 6)]
        if name != "sft":
            history = [dict(h, reward_margin=0.1 * h["step"], reward_accuracy=0.2 * h["step"]) for h in history]
        self.train_summary = {"kind": name, "history": history, "dev_history": [],
                              "model_dir": "/m/%s/%s" % (current.run_id, name),
                              "init": "embedded:tiny" if name == "sft" else "/m/%s/sft" % current.run_id,
                              "config": {"lr": 5.0e-6}}
        self.next(self.evaluate)

    @step
    def evaluate(self):
        offset = 0.0 if self.variant["name"] == "sft" else 2.5
        self.result = {"variant": self.variant["name"], "model_dir": self.train_summary["model_dir"],
                       "init": self.train_summary["init"], "epoch": 1, "evaluated": True,
                       "win_rate": self.lc - 5 + offset, "standard_error": 1.5,
                       "length_controlled_winrate": self.lc + offset, "lc_standard_error": 1.25, "n_total": 8,
                       "avg_length": 100, "lc_method": "length_controlled_v1_minimal", "judge": "test-judge",
                       "eval_set": "embedded", "reference_generator": "embedded:tiny"}
        if self.typed:
            from steps.evaluate.results import AlpacaEvalResult, EvalFiles, EvalResult, JudgeRecord, WinRates

            r = self.result
            scores = WinRates(r["win_rate"], 1.5, 4, 4, 0, 8, 50.0, 100, r["lc_method"], None, False,
                              r["length_controlled_winrate"], 1.25, None)
            tokens = {"prompt": 0, "completion": 0, "total": 0, "n_judgements": 0, "n_without_counts": 0}
            judge = JudgeRecord("test-judge", False, {}, None, tokens, None, None, "unpriced")
            evaluation = AlpacaEvalResult(r["model_dir"], "g", scores, judge, None, "embedded", "embedded", True, 8,
                                          "embedded:tiny", {"dtype": "float32"}, EvalFiles("o", "a", "m"))
            self.result = EvalResult(r["variant"], r["variant"], r["model_dir"], r["init"], 1, evaluation)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.merge_artifacts(inputs, include=["run_config"])
        config = {"lr": 5.0e-6, "criterion_config": {"beta": 0.1}}
        if self.typed:
            from steps.evaluate.results import VariantResult

            self.results = sorted([VariantResult(i.result, 5, 1.0, {}, config) for i in inputs],
                                  key=lambda r: r.variant != "sft")
        else:
            self.results = sorted([dict(i.result, training_config=config) for i in inputs],
                                  key=lambda r: r["variant"] != "sft")
        self.next(self.report)

    @card(type="blank", id="report")
    @step
    def report(self):
        from steps.report import report_in_step

        self.report_files = report_in_step()
        self.next(self.end)

    @step
    def end(self):
        if self.fail_at_end:
            raise RuntimeError("failing on purpose after the report step")


if __name__ == "__main__":
    PrefFlow()
'''


@pytest.fixture(scope="module")
def metaflow_runs(tmp_path_factory):
    """Four runs: A (tag a, LC 40), B (tag b, LC 60), C (tag b, LC 70, fails in end), D (branch sweep, LC 50,
    typed results as the pipeline stores them now; A-C store the plain dicts of earlier runs)."""
    from metaflow import Runner

    root = tmp_path_factory.mktemp("mf")
    flow_file = root / "shapeflow.py"
    flow_file.write_text(textwrap.dedent(SHAPE_FLOW))
    # The datastore root is also the working directory: local cards are written under the working
    # directory's .metaflow and read back from the task's datastore root, so the two must coincide.
    base_env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root), "USERNAME": "prefflow", "PYTHONPATH": str(REPO)}
    runs = {}
    plan = [
        ("A", {"tags": ["a"], "lc": 40.0}, {}),
        ("B", {"tags": ["b"], "lc": 60.0}, {}),
        ("C", {"tags": ["b"], "lc": 70.0, "fail_at_end": True}, {}),
        ("D", {"tags": ["c"], "lc": 50.0, "typed": True}, {"branch": "sweep"}),
    ]
    for name, run_args, top_level in plan:
        env = dict(base_env, PREFFLOW_REPORT_DIR=str(root / f"step_report_{name}"))
        with Runner(str(flow_file), show_output=False, pylint=False, env=env, cwd=str(root), **top_level) as runner:
            result = runner.run(**run_args)
            expected = "failed" if run_args.get("fail_at_end") else "successful"
            assert result.status == expected, f"run {name}: {result.status}\n{result.stderr[-3000:]}"
            runs[name] = result.run.pathspec
    return {"root": root, "ds": root, "runs": runs}


def _rows(paths) -> list[dict]:
    return json.loads(paths.results_json.read_text())["rows"]


def test_report_from_metaflow_runs(metaflow_runs, tmp_path):
    runs = metaflow_runs["runs"]
    paths = generate_report(out_dir=tmp_path, datastore_root=metaflow_runs["ds"])
    assert paths.runs == [runs["A"], runs["B"], runs["D"]]  # successful only, oldest first
    rows = _rows(paths)
    assert [(r["run_id"], r["loss_function"], r["lc_winrate"], r["winrate"]) for r in rows] == [
        (runs["A"].split("/")[1], "SFT", 40.0, 35.0),
        (runs["A"].split("/")[1], "DPO", 42.5, 37.5),
        (runs["B"].split("/")[1], "SFT", 60.0, 55.0),
        (runs["B"].split("/")[1], "DPO", 62.5, 57.5),
        (runs["D"].split("/")[1], "SFT", 50.0, 45.0),
        (runs["D"].split("/")[1], "DPO", 52.5, 47.5),
    ]
    from metaflow import Run

    with client_scope(None, metaflow_runs["ds"]):
        created = Run(runs["B"]).created_at.astimezone(timezone.utc).strftime("%Y-%m-%d")
    assert rows[2]["date"] == created and rows[3]["model_initialization"] == "SFT (from embedded:tiny)"
    cells = table_cells(paths.results_md.read_text())
    assert cells[0][:6] == DOCUMENTED and len(cells) == 2 + 6
    for row in rows:
        snap = yaml.safe_load((tmp_path / row["config_snapshot"]).read_text())
        assert snap["training_config"] == {"lr": 5e-6, "criterion_config": {"beta": 0.1}}
        assert snap["run_config"]["name"] == "shape"
    assert set(paths.training_pngs) == {runs["A"], runs["B"], runs["D"]}
    from metaflow import Run

    from steps.evaluate.results import EvalResult, VariantResult
    from steps.report.records import read_run

    with client_scope(None, metaflow_runs["ds"]):
        record = read_run(Run(runs["A"]))
        typed = read_run(Run(runs["D"]))  # the Client API gives the typed artifacts back
        evaluated = [t.data.result for t in Run(runs["D"])["evaluate"]]
    assert all(isinstance(r, dict) for r in record.results) and all(isinstance(r, VariantResult) for r in typed.results)
    assert sorted(e.variant for e in evaluated) == ["dpo", "sft"] and all(isinstance(e, EvalResult) for e in evaluated)
    assert {e.variant: e for e in evaluated} == {r.variant: r.evaluation for r in typed.results}
    assert set(record.training_curves) == {"sft", "dpo"}  # curve labels are variant names
    panels = [(title, [label for label, _ in series]) for _, title, series in training_panels(record)]
    assert panels[:2] == [("SFT loss", ["SFT"]), ("preference loss", ["DPO"])]
    assert all(p.is_file() for p in paths.training_pngs.values()) and paths.win_rates_png.is_file()


def test_report_filters(metaflow_runs, tmp_path):
    import metaflow

    runs, ds = metaflow_runs["runs"], metaflow_runs["ds"]
    metaflow.metadata(f"local@{ds}")  # a caller with a datastore (test_client_scope_... switches between two)
    before = (metaflow.get_metadata(), metaflow.get_namespace())
    assert generate_report(Selection(tags=("b",)), tmp_path / "b", ds).runs == [runs["B"]]
    assert generate_report(Selection(latest=1), tmp_path / "l1", ds).runs == [runs["D"]]
    assert generate_report(Selection(latest=2), tmp_path / "l2", ds).runs == [runs["B"], runs["D"]]
    assert generate_report(Selection(namespace="user:prefflow"), tmp_path / "ns", ds).runs == [
        runs["A"],
        runs["B"],
        runs["D"],
    ]
    empty = generate_report(Selection(namespace="user:somebody-else"), tmp_path / "none", ds)
    assert empty.runs == [] and "No successful runs match" in empty.results_md.read_text()
    branch = generate_report(Selection(tags=("project_branch:test.sweep",)), tmp_path / "br", ds)
    assert branch.runs == [runs["D"]]
    with_failed = generate_report(Selection(tags=("b",)), tmp_path / "inc", ds, [runs["C"]])
    assert with_failed.runs == [runs["B"], runs["C"]]
    assert [r["lc_winrate"] for r in _rows(with_failed)] == [60.0, 62.5, 70.0, 72.5]
    with pytest.raises(ReportError, match="latest"):
        generate_report(Selection(latest=0), tmp_path / "bad", ds)
    with pytest.raises(ReportError, match="NoSuchFlow"):
        generate_report(Selection(flow="NoSuchFlow"), tmp_path / "bad", ds)
    with pytest.raises(ReportError, match=r"\.metaflow"):
        generate_report(out_dir=tmp_path / "bad", datastore_root=tmp_path)
    assert (metaflow.get_metadata(), metaflow.get_namespace()) == before  # the caller's Client state is kept


def test_client_scope_puts_back_the_callers_namespace_and_datastore(metaflow_runs, tmp_path):
    """The report switches namespace and metadata through Metaflow's public calls; afterwards the caller's
    get_namespace()/get_metadata() are what they were and its Client calls read its own datastore again."""
    import shutil

    import metaflow
    from metaflow import Flow, Run

    runs, ds = metaflow_runs["runs"], metaflow_runs["ds"]
    flow_name, d_id = runs["D"].split("/")
    mine = tmp_path / "mine"  # the caller's own datastore: the same runs except D
    shutil.copytree(ds / ".metaflow", mine / ".metaflow")
    shutil.rmtree(mine / ".metaflow" / flow_name / d_id)
    try:
        metaflow.metadata(str(mine))
        metaflow.namespace("user:somebody-else")
        before = (metaflow.get_metadata(), metaflow.get_namespace())
        assert before == (f"local@{mine}", "user:somebody-else")
        # the report reads the other datastore in the global namespace: D is there, and visible
        assert generate_report(out_dir=tmp_path / "r", datastore_root=ds).runs == [runs["A"], runs["B"], runs["D"]]
        assert (metaflow.get_metadata(), metaflow.get_namespace()) == before
        with client_scope("user:prefflow", ds):
            sft = Run(runs["D"])["join"].task["results"].data[0].evaluation
            assert sft.alpaca_eval.scores.length_controlled_winrate == 50.0
        with pytest.raises(ReportError, match="latest"):  # an error inside the scope restores too
            generate_report(Selection(latest=0), tmp_path / "bad", ds)
        assert (metaflow.get_metadata(), metaflow.get_namespace()) == before
        metaflow.namespace(None)
        # the caller's Client reads its own copy again: no D there, A's artifacts load from it
        assert sorted(r.pathspec for r in Flow(flow_name)) == sorted([runs["A"], runs["B"], runs["C"]])
        assert Run(runs["A"])["join"].task["results"].data[0]["length_controlled_winrate"] == 40.0
    finally:
        metaflow.metadata(f"local@{ds}")
        metaflow.default_namespace()


def test_pipeline_report_step_includes_its_own_run_and_card(metaflow_runs):
    from metaflow import Run
    from metaflow.cards import get_cards

    root, runs = metaflow_runs["root"], metaflow_runs["runs"]
    # B's report step ran before B's end: B is included as the current run, A (same branch) as successful.
    step_b = json.loads((root / "step_report_B" / "results.json").read_text())
    assert [r["pathspec"] for r in step_b["runs"]] == [runs["A"], runs["B"]]
    # C failed after its report step: the report it wrote still covers it (passed via include_runs).
    step_c = json.loads((root / "step_report_C" / "results.json").read_text())
    assert [r["pathspec"] for r in step_c["runs"]] == [runs["A"], runs["B"], runs["C"]]
    # D ran on another @project branch: its report does not mix in the user branch's runs.
    step_d = json.loads((root / "step_report_D" / "results.json").read_text())
    assert [r["pathspec"] for r in step_d["runs"]] == [runs["D"]]
    with client_scope(None, metaflow_runs["ds"]):
        task = Run(runs["B"])["report"].task
        assert task["report_files"].data["n_rows"] == 4
        html = get_cards(task, id="report")[0].get()
    components = card_components(html)
    assert [c["type"] for c in components] == ["markdown", "image", "image"]
    assert "## Results report" in components[0]["source"] and "| LC WR | WR |" in components[0]["source"]
    assert components[2]["label"] == f"training curves of {runs['B']}"


def card_components(html: str) -> list[dict]:
    """The components of a Metaflow card: its data is base64 JSON inside the self-contained HTML."""
    data = re.search(r'window.__MF_DATA__\["[^"]+"\] = "([^"]+)"', html)
    page = json.loads(base64.b64decode(data.group(1)))["components"][0]
    return [c for section in page["contents"] for c in section["contents"]]


def _cli(ds: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, USERNAME="prefflow", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "steps.report", "--datastore-root", str(ds), "--out-dir", str(out), "-q", *extra],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_concurrent_generations_are_whole_and_idempotent(metaflow_runs, tmp_path):
    ds = metaflow_runs["ds"]
    serial = tmp_path / "serial"
    proc = _cli(ds, serial)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "3 runs, 6 models" in out
    expected = {p.relative_to(serial): p.read_bytes() for p in serial.rglob("*") if p.is_file()}

    shared = tmp_path / "shared"
    shared.mkdir()
    with open(shared / ".report.lock", "a+b") as lock:  # hold the report lock: both jobs must wait for it
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        procs = [_cli(ds, shared), _cli(ds, shared)]
        time.sleep(3.0)
        assert all(p.poll() is None for p in procs) and not (shared / "results.md").exists()
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    got = {p.relative_to(shared): p.read_bytes() for p in shared.rglob("*") if p.is_file()}
    got.pop(Path(".report.lock"))
    expected.pop(Path(".report.lock"))
    assert got == expected  # same files, byte-identical: nothing torn, duplicated or stale
    text = (shared / "results.md").read_text()
    table = table_cells(text)
    assert len(table) == 2 + 6 and len({tuple(r) for r in table[2:]}) == 6
    assert text.count("# PrefFlow results") == 1

    bad = _cli(ds, tmp_path / "x", "--flow", "NoSuchFlow")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "NoSuchFlow" in err and "run the pipeline first" in err


def test_report_flow_reads_its_project_branch(metaflow_runs, tmp_path):
    """flows/report.py run by hand: the same report, limited to PrefFlow runs of its @project branch."""
    from metaflow import Runner

    runs, root = metaflow_runs["runs"], metaflow_runs["root"]
    config = tmp_path / "deploy.yaml"
    config.write_text("deployment:\n  project: prefflow_report_test\n")
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root), "USERNAME": "prefflow", "PYTHONPATH": str(REPO)}
    with Runner(
        str(REPO / "flows" / "report.py"),
        show_output=False,
        pylint=False,
        env=env,
        cwd=str(root),
        config=[("config", str(config))],
    ) as runner:
        result = runner.run(out_dir=str(tmp_path / "out"))
        assert result.status == "successful", result.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["pathspec"] for r in doc["runs"]] == [runs["A"], runs["B"]]  # not C (failed), not D (other branch)
    assert doc["selection"]["tags"] == ["project:prefflow_report_test", "project_branch:user.prefflow"]


def test_report_flow_config_reads_only_the_deployment_section():
    from steps.config import ConfigError, parse_deployment_text

    assert parse_deployment_text("data: {input: embedded}\ndeployment:\n  project: my_team\n") == {
        "deployment": {"schedule_cron": None, "project": "my_team", "trigger_event": None}
    }
    assert parse_deployment_text("")["deployment"]["project"] == "prefflow"
    with pytest.raises(ConfigError, match=r"deployment\.projekt.*did you mean 'project'"):
        parse_deployment_text("deployment: {projekt: x}\n")
    with pytest.raises(ConfigError, match=r"deployment\.project.*lowercase"):
        parse_deployment_text("deployment: {project: My-Team}\n")
    with pytest.raises(ConfigError, match="6-field AWS form"):
        parse_deployment_text("deployment: {schedule_cron: '0 3 * * *'}\n")
    # the report flow never trains: reading its config must not import torch (the loss registry)
    probe = (
        "import sys; from steps.config import parse_deployment_text; "
        "parse_deployment_text('preference: {criterion: dpo}\\ndeployment: {project: x}'); "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(root).parts) and not p.parts[-1].endswith(".egg-info")
    }


def test_cli_writes_the_report_where_the_user_runs(metaflow_runs, tmp_path):
    """No --out-dir, no $PREFFLOW_REPORT_DIR: ./reports of the working directory; the checkout is untouched."""
    before = _tree_state(REPO)
    env = {k: v for k, v in os.environ.items() if k != "PREFFLOW_REPORT_DIR"}
    proc = subprocess.run(
        [sys.executable, "-m", "steps.report", "--datastore-root", str(metaflow_runs["ds"]), "-q"],
        cwd=tmp_path,
        env=dict(env, USERNAME="prefflow", PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "reports" / "results.json").read_text())["rows"]
    assert len(rows) == 6 and (tmp_path / "reports" / "README.md").is_file()
    assert _tree_state(REPO) == before
    # the same default for the pipeline's report step and flows/report.py
    probe = "from steps.report import default_report_dir; print(default_report_dir())"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=dict(env, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    assert Path(out) == tmp_path / "reports"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        text=True,
        timeout=120,
        capture_output=True,
        env=dict(env, PYTHONPATH=str(REPO), PREFFLOW_REPORT_DIR=str(tmp_path / "elsewhere")),
    ).stdout
    assert Path(out.strip()) == tmp_path / "elsewhere"


def test_the_runs_own_table_is_the_reports_table():
    """What the flow prints and shows in its results card: the report's cells (SFT, SimPO, nll_scale=0)."""
    from datetime import datetime, timezone

    from steps.pipeline import format_results_table

    results = [
        {
            "variant": "sft",
            "loss": "sft",
            "model_dir": "/r/sft",
            "init": "base: tiny",
            "epoch": 1,
            "evaluated": True,
            "win_rate": 41.254,
            "length_controlled_winrate": 50.0,
            "training_config": {"lr": 2e-5, "epochs": 1},
        },
        {
            "variant": "simpo",
            "loss": "simpo",
            "model_dir": "/r/simpo",
            "init": "SFT checkpoint",
            "epoch": 1,
            "evaluated": True,
            "win_rate": 45.85,
            "length_controlled_winrate": None,
            "judge": "j",
            "training_config": {
                "lr": 5e-6,
                "criterion_config": {
                    "_type_": "steps.losses.simpo.SimPOConfig",
                    "beta": 1.0,
                    "gamma": 0.5,
                    "nll_scale": 0.0,
                },
            },
        },
    ]
    text = format_results_table(results, "PrefFlow", "17", datetime(2026, 1, 2, tzinfo=timezone.utc))
    header, _, sft, simpo = table_cells(text)
    assert header == COLUMNS
    assert sft[:6] == ["50.00", "41.25", "SFT", "lr=2e-05", "1", "base: tiny"]
    assert simpo[:6] == [
        "n/a",
        "45.85",
        "SimPO",
        "lr=5e-06, beta=1, gamma=0.5, nll_scale=0",
        "1",
        "SFT checkpoint",
    ]
    assert simpo[COLUMNS.index("Judge")] == "j"
    assert simpo[-4:] == ["2026-01-02", "`PrefFlow/17`", "n/a", "n/a"]  # no IFBench in these results
