"""On-policy rounds in the flow: ``preference.on_policy`` checked at planning (errors name the field), which variants
run rounds, the report's Round columns; and (slow) a real Metaflow run of 2 on-policy rounds of DPO with the tiny
model and the local judge: one task per round, one join row per round, every round's data and model kept."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest

from steps.config import ConfigError
from steps.config.plan import load_plan
from steps.evaluate.results import PairedVs
from steps.pipeline import variant_route
from steps.report.records import RunRecord
from steps.report.rows import rows_for_run
from steps.report.table import COLUMNS, EXPORT_FIELDS, ROUND_COLUMNS, ROUND_FIELDS, markdown_table, results_csv
from tests.eval_results import alpaca_eval_result, variant_result

REPO = Path(__file__).resolve().parents[1]
ON = {"enabled": True, "rounds": 2, "max_prompts": 4, "max_new_tokens": 8, "temperature": 1.0}


def _plan(on_policy: dict, loss: str = "dpo", **sections):
    data = {"model": {"base": "tiny"}, "preference": {"on_policy": on_policy}, **sections}
    return load_plan(data, "cfg.yaml", loss_arg=loss)


def _error(on_policy: dict, **sections) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        _plan(on_policy, **sections)
    return caught.value


def test_default_config_trains_no_rounds():
    plan = _plan({})
    assert not plan.config.preference.on_policy.enabled
    assert [variant_route("one_node", p) for p in plan.variants] == ["one_node", "one_node"]
    assert [variant_route("gang", p) for p in plan.variants] == ["one_node", "gang"]


def test_pair_losses_run_rounds_and_sft_and_kto_do_not():
    plan = _plan(ON, loss="dpo,simpo,kto")
    assert {p.name: variant_route("one_node", p) for p in plan.variants} == {
        "sft": "one_node",
        "dpo": "rounds",
        "simpo": "rounds",
        "kto": "one_node",  # unpaired feedback: no pairs to sample and judge
    }


@pytest.mark.parametrize(
    ("on_policy", "sections", "key", "says"),
    [
        ({**ON, "rounds": 0}, {}, "preference.on_policy.rounds", "must be >= 1"),
        ({**ON, "samples_per_prompt": 1}, {}, "preference.on_policy.samples_per_prompt", "a pair needs two"),
        ({**ON, "prompts": "eval"}, {}, "preference.on_policy.prompts", "never train on evaluation"),
        ({"rounds": 3}, {}, "preference.on_policy.rounds", "enabled is false"),
        ({**ON, "prompts": "/nowhere/prompts.jsonl"}, {}, "preference.on_policy.prompts", "no such file"),
        ({**ON, "judge": "gpt5_oracle"}, {}, "preference.on_policy.judge", "unknown judge"),
        ({**ON, "reference": "sft"}, {"sft": {"enabled": False}}, "preference.on_policy.reference", "sft.enabled"),
        ({**ON}, {"resources": {"num_nodes": 2}}, "preference.on_policy.enabled", "one node"),
    ],
)
def test_bad_on_policy_settings_fail_at_planning_naming_the_field(on_policy, sections, key, says):
    error = _error(on_policy, **sections)
    assert error.key == key and says in error.message and "cfg.yaml" in str(error)


def _round_record() -> RunRecord:
    """A run with SFT and two rounds of DPO, hand-made: round 1 +10 WR over SFT, round 2 -5 over round 1."""
    sft = variant_result("sft", alpaca_eval_result(win_rate=40.0), paired_vs=PairedVs("sft", is_baseline=True))
    rounds = []
    for number, wr, previous, delta in ((1, 50.0, "sft", 10.0), (2, 45.0, "dpo-round-1", -5.0)):
        row = variant_result(
            f"dpo-round-{number}",
            alpaca_eval_result(win_rate=wr),
            init="SFT checkpoint" if number == 1 else f"round {number - 1}",
        )
        evaluation = dataclasses.replace(row.evaluation, round=number, round_of="dpo")
        comparison = {"paired_delta_wr": delta, "paired_ci95": [delta - 3, delta + 3], "distinguishable": True}
        paired = PairedVs(previous, comparison=comparison)
        rounds.append(dataclasses.replace(row, evaluation=evaluation, paired_previous=paired))
    return RunRecord("PrefFlow", "7", _date(), [], [], True, results=[rounds[1], sft, rounds[0]])


def _date():
    from datetime import datetime, timezone

    return datetime(2026, 12, 7, tzinfo=timezone.utc)


def test_report_rows_of_rounds_get_round_columns_at_the_end():
    rows = rows_for_run(_round_record())
    assert [(r.variant, r.round, r.loss_function, r.model_initialization) for r in rows] == [
        ("sft", None, "SFT", "base: tiny"),
        ("dpo-round-1", 1, "DPO", "SFT checkpoint"),
        ("dpo-round-2", 2, "DPO", "round 1"),
    ]
    table = markdown_table(rows, links=False).splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS + ROUND_COLUMNS) + " |"
    cells = [line.split(" | ")[-2:] for line in table[2:5]]
    assert cells == [
        ["n/a", "n/a |"],
        ["1", "+10.00 [+7.00, +13.00] vs SFT |"],
        ["2", "-5.00 [-8.00, -2.00] vs round 1 |"],
    ]
    exported = list(csv.DictReader(io.StringIO(results_csv(rows))))
    assert list(exported[0]) == EXPORT_FIELDS + ROUND_FIELDS
    assert [(r["round"], r["paired_previous"], r["paired_previous_delta_wr"]) for r in exported] == [
        ("", "", ""),
        ("1", "sft", "10.0"),
        ("2", "dpo-round-1", "-5.0"),
    ]


def test_report_without_rounds_keeps_its_columns():
    record = _round_record()
    record.results = [r for r in record.results if r.evaluation.round is None]
    rows = rows_for_run(record)
    assert markdown_table(rows, links=False).splitlines()[0] == "| " + " | ".join(COLUMNS) + " |"
    assert results_csv(rows).splitlines()[0].split(",") == EXPORT_FIELDS


def test_win_rate_by_round_plot_starts_from_the_init_row():
    from steps.report.plots import round_series, win_rate_by_round_png

    rows = rows_for_run(_round_record())
    series = round_series(rows)
    assert {k: [(r.variant, r.winrate) for r in v] for k, v in series.items()} == {
        "7 DPO": [("sft", 40.0), ("dpo-round-1", 50.0), ("dpo-round-2", 45.0)]
    }
    assert win_rate_by_round_png(rows)[:8] == b"\x89PNG\r\n\x1a\n"
    assert win_rate_by_round_png([r for r in rows if r.round is None]) is None


def test_each_round_is_compared_with_the_model_it_started_from(tmp_path):
    from types import SimpleNamespace

    from steps.config import EvaluationConfig
    from steps.onpolicy.round_results import add_previous_round

    def judged(name: str, preferences: list[float]) -> str:
        rows = [
            {"instruction": f"q{i}", "output_1": f"reference {i}", "output_2": f"{name} {i}", "preference": p}
            for i, p in enumerate(preferences)
        ]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
        return str(path)

    sft = variant_result("sft", alpaca_eval_result(judged("sft", [1.0, 2.0, 1.5, 1.25])), model_dir="/runs/sft")
    rounds = []
    for number, preferences in ((1, [2.0, 2.0, 1.0, 1.75]), (2, [1.5, 1.0, 1.0, 2.0])):
        row = variant_result(f"dpo-round-{number}", alpaca_eval_result(judged(f"r{number}", preferences)))
        evaluation = dataclasses.replace(row.evaluation, round=number, round_of="dpo")
        rounds.append(dataclasses.replace(row, evaluation=evaluation))
    summaries = [SimpleNamespace(init=init) for init in ("base", "/runs/sft", "/runs/dpo-round-1")]
    out = add_previous_round([sft, *rounds], summaries, EvaluationConfig())  # type: ignore[arg-type]
    assert out[0].paired_previous is None  # not a round
    previous = [(r.paired_previous.baseline, r.paired_previous.comparison["paired_delta_wr"]) for r in out[1:]]
    # wins (preference - 1): sft 0, 1, .5, .25; round 1: 1, 1, 0, .75; round 2: .5, 0, 0, 1
    assert previous == [("sft", pytest.approx(25.0)), ("dpo-round-1", pytest.approx(-31.25))]


# -- a real run ----------------------------------------------------------------------------------------------------

#: test_flow's tiny run, DPO only, in 2 on-policy rounds of 4 prompts x 2 samples judged by the tiny local judge
ROUNDS = {
    "enabled": True,
    "rounds": 2,
    "samples_per_prompt": 2,
    "max_prompts": 4,
    "max_new_tokens": 8,
    "temperature": 1.0,
    "judge": "local_logprob",
    "judge_model": "tiny",
}


def rounds_config(output_dir: Path, on_policy: dict | None = None, evaluation: dict | None = None) -> str:
    """tests/test_flow.py's tiny config with on-policy rounds (``on_policy``, ``evaluation``: entries changed)."""
    import yaml

    from tests.test_flow import TINY_CONFIG

    doc = yaml.safe_load(TINY_CONFIG.replace("OUTPUT_DIR", str(output_dir)))
    del doc["tracking"], doc["push_to_hub"], doc["preference"]["per_loss"]
    doc["preference"]["on_policy"] = {**ROUNDS, **(on_policy or {})}
    doc["evaluation"].update(evaluation or {})
    return yaml.safe_dump(doc, sort_keys=False)


def flow_env(tmp_path: Path) -> dict[str, str]:
    from tests.test_flow import _env

    cards = str(tmp_path / "mf" / "mf.cards")  # else cards land in the working directory
    return {**_env(tmp_path), "METAFLOW_CARD_LOCALROOT": cards, "PREFFLOW_MIN_FREE_MB": "1"}


def paired_delta(annotations: str, baseline: str) -> float:
    """The mean per-instruction win difference x 100, from the two annotation files (alpaca_eval: win = pref - 1)."""
    a = {r["instruction"]: r["preference"] for r in json.loads(Path(annotations).read_text())}
    b = {r["instruction"]: r["preference"] for r in json.loads(Path(baseline).read_text())}
    shared = [k for k in a if k in b]
    return sum((a[k] - 1) - (b[k] - 1) for k in shared) / len(shared) * 100


@pytest.fixture(scope="module")
def rounds_run(tmp_path_factory):
    from metaflow import Runner

    tmp = tmp_path_factory.mktemp("onpolicy_flow")
    config = tmp / "config.yaml"
    config.write_text(rounds_config(tmp / "runs"))
    with Runner(
        str(REPO / "flows" / "pipeline.py"),
        show_output=False,
        env=flow_env(tmp),
        cwd=str(REPO),
        config=[("config", str(config))],
    ).run(loss="dpo") as running:
        status, run, stderr = running.status, running.run, running.stderr
    assert status == "successful", stderr[-4000:]
    return run, tmp


@pytest.mark.slow
def test_two_on_policy_rounds_of_dpo_run_end_to_end(rounds_run):
    from metaflow import namespace

    from steps.io import read_json, read_jsonl

    run, tmp = rounds_run
    namespace(None)
    tasks = sorted(run["onpolicy_round"].tasks(), key=lambda t: len(t.data.round_outcomes))
    assert [[o.round for o in t.data.round_outcomes] for t in tasks] == [[1], [1, 2]]  # a task per round
    results = {r.variant: r for r in run["join"].task.data.results}
    assert list(results) == ["sft", "dpo-round-1", "dpo-round-2"]
    sft_dir = run["sft"].task.data.sft_summary.model_dir
    outcomes = tasks[1].data.round_outcomes
    assert [o.train.init for o in outcomes] == [sft_dir, outcomes[0].train.model_dir]  # round 1 from SFT
    assert [o.train.reference for o in outcomes] == [sft_dir, outcomes[0].train.model_dir]  # the round's start
    assert [results[f"dpo-round-{n}"].evaluation.init for n in (1, 2)] == ["SFT checkpoint", "round 1"]
    root = Path(run["start"].task.data.output_root)
    for number, outcome in enumerate(outcomes, 1):
        where = root / "dpo" / "rounds" / f"round-{number:03d}"
        assert outcome.round_dir == str(where) and outcome.round == number
        stats = read_json(where / "round_stats.json")
        assert stats == outcome.stats and stats["round"] == number and stats["prompts"] == 4
        assert stats["policy"] == (sft_dir if number == 1 else outcomes[0].train.model_dir)
        pairs = read_jsonl(where / "preference.train.jsonl")
        assert len(pairs) == stats["pairs_kept"] == stats["candidate_pairs"] - stats["dropped_ties"] > 0
        assert len(read_jsonl(where / "samples.jsonl")) == 8 and len(read_jsonl(where / "judgements.jsonl")) == 4
        assert outcome.train.model_dir == str(where / "train" / "final") and outcome.train.steps >= 1
        assert math.isfinite(outcome.train.final_train["loss"])
        assert (where / "train" / "final" / "model.safetensors").is_file()
    # every round's row compared with SFT and with the model it started from, numbers from the annotation files
    annotations = {name: r.evaluation.alpaca_eval.files.annotations for name, r in results.items()}
    for number, before in ((1, "sft"), (2, "dpo-round-1")):
        row = results[f"dpo-round-{number}"]
        assert row.paired_vs.baseline == "sft" and row.paired_previous.baseline == before
        assert row.paired_vs.comparison["paired_delta_wr"] == pytest.approx(
            paired_delta(annotations[row.variant], annotations["sft"]), abs=1e-9
        )
        assert row.paired_previous.comparison["paired_delta_wr"] == pytest.approx(
            paired_delta(annotations[row.variant], annotations[before]), abs=1e-9
        )
    # the report: a Round column at the end of the table and the CSV, and the plot by round
    report = tmp / "reports"
    exported = {r["variant"]: r for r in csv.DictReader(io.StringIO((report / "results.csv").read_text()))}
    assert list(next(iter(exported.values())))[-len(ROUND_FIELDS) :] == ROUND_FIELDS
    assert [exported[v]["round"] for v in ("sft", "dpo-round-1", "dpo-round-2")] == ["", "1", "2"]
    assert [exported[v]["model_initialization"] for v in ("dpo-round-1", "dpo-round-2")] == [
        "SFT checkpoint",
        "round 1",
    ]
    assert (report / "plots" / "win_rate_by_round.png").is_file()
    from steps.report.records import read_run

    curves = read_run(run).training_curves  # each round's training curves, read back by the report
    assert [len(curves[f"dpo-round-{n}"].history) for n in (1, 2)] == [o.train.steps for o in outcomes]
    assert "win_rate_by_round.png" in (report / "README.md").read_text()
