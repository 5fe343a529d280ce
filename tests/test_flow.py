"""Real Metaflow runs of flows/pipeline.py (Runner API, isolated datastore) on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY_CONFIG = """
name: tiny_test
data: {input: embedded, max_trees: 14, dev_fraction: 0.2}
model: {base: tiny, dtype: float32}
sft: {lr: 1.0e-3, max_num_tokens: 1024, max_seq_len: 256, overlength: truncate, max_steps: 2, warmup_steps: 0}
preference:
  criterion: dpo
  criterion_config: {beta: 0.1}
  lr: 1.0e-3
  max_num_tokens: 1024
  max_seq_len: 256
  overlength: truncate
  max_steps: 2
  per_loss:
    orpo: {criterion_config: {orpo_lambda: 0.2}}
evaluation:
  eval_set: embedded
  max_instructions: 3
  judge: local_logprob
  judge_model: tiny
  max_new_tokens: 6
  batch_size: 3
  ifbench: {limit: 3}
resources: {output_dir: OUTPUT_DIR}
tracking: {backends: [tensorboard, mlflow]}
push_to_hub: {repo_id: "prefflow-test/tiny-{variant}", variants: [dpo], dry_run: true}
"""


def _env(tmp_path: Path) -> dict:
    return {
        "USERNAME": "prefflow-test",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PREFFLOW_REPORT_DIR": str(tmp_path / "reports"),
    }


def _config(tmp_path: Path, text: str = TINY_CONFIG) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(text.replace("OUTPUT_DIR", str(tmp_path / "runs")))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer):
    from metaflow import Runner

    tmp_path = tmp_path_factory.mktemp("flow")
    with Runner(
        str(REPO / "flows" / "pipeline.py"),
        show_output=False,
        env=_env(tmp_path),
        cwd=str(REPO),
        config=[("config", str(_config(tmp_path)))],
    ).run(loss="dpo,orpo") as running:
        status = running.status
        run = running.run
        stdout = running.stdout
        stderr = running.stderr
    assert status == "successful", stderr[-4000:]
    return run, stdout, tmp_path


def test_flow_runs_prepare_sft_preference_evaluate(finished_run):
    run, stdout, tmp_path = finished_run
    from metaflow import namespace

    from steps.evaluate import EvalResult, PairedVs, VariantResult

    namespace(None)
    start = run["start"].task.data
    assert start.losses == ["dpo", "orpo"]
    assert [(v.name, v.loss, v.variant.overrides, v.config.preference.criterion) for v in start.variants] == [
        ("sft", "sft", {}, "dpo"),
        ("dpo", "dpo", {}, "dpo"),
        ("orpo", "orpo", {}, "orpo"),
    ]
    assert start.variants[2].config.preference.criterion_config.orpo_lambda == 0.2  # planned once, in start
    data = run["prepare_data"].task.data
    assert data.data_stats["sft_examples"] > 0 and data.data_stats["pairs"]["best_vs_rest"] > 0
    assert Path(data.data_dir, "preference.train.jsonl").exists()
    results = {r.variant: r for r in run["join"].task.data.results}
    assert set(results) == {"sft", "dpo", "orpo"}
    assert results["dpo"].evaluation.init == "SFT checkpoint"
    assert results["orpo"].evaluation.init == "base: tiny"  # the documented recipe: ORPO from the base model
    assert results["orpo"].training_config["criterion_config"]["orpo_lambda"] == 0.2
    dev_pairs = len(Path(data.data_dir, "preference.dev.jsonl").read_text().splitlines())
    for r in results.values():
        evaluated, held_out = r.evaluation.alpaca_eval, r.evaluation.heldout
        assert evaluated is not None and evaluated.scores.win_rate is not None
        assert 0.0 <= evaluated.scores.win_rate <= 100.0 and evaluated.scores.n_total == 3
        assert evaluated.scores.lc_method and evaluated.judge.label.startswith("local_logprob")
        # 3 instructions: LC is not shown, and says why
        assert evaluated.scores.length_controlled_winrate is None
        assert "at least 50" in (evaluated.scores.lc_unavailable_reason or "")
        # judge-free accuracy on the dev pairs, cut at the variant's own max_seq_len, also in metrics.json
        assert held_out is not None and held_out.n_pairs == dev_pairs and 0.0 <= held_out.preference_accuracy <= 1.0
        assert held_out.max_seq_len == r.training_config["max_seq_len"]
        assert json.loads(Path(evaluated.files.metrics).read_text())["heldout_preference"] == held_out.as_dict()
    # every row records what produced it, the same for all three (so they pair), and it survives the artifact
    recorded = [r.evaluation.alpaca_eval.provenance for r in results.values() if r.evaluation.alpaca_eval]
    assert len(recorded) == 3 and recorded[0] is not None and all(p == recorded[0] for p in recorded)
    assert (recorded[0].judge, recorded[0].eval_set_size, recorded[0].decoding["max_new_tokens"]) == (
        "local:tiny",
        3,
        6,
    )
    assert results["sft"].paired_vs == PairedVs("sft", is_baseline=True)
    for name in ("dpo", "orpo"):  # both compared with SFT on the same 3 instructions
        paired = results[name].paired_vs
        assert paired is not None and paired.baseline == "sft" and paired.comparison is not None
        assert paired.comparison["paired_n"] == 3
        low, high = paired.comparison["paired_ci95"]
        assert low <= paired.comparison["paired_delta_wr"] <= high
    # IFBench on every model (3 type-balanced prompts), and the paired Δ of its prompt-level strict accuracy
    for name, r in results.items():
        ifbench = r.evaluation.ifbench
        assert ifbench is not None and ifbench.n_prompts == 3 and ifbench.provenance["limit"] == 3, name
        strict = ifbench.prompt_strict
        assert strict.n_scored + strict.n_unscored == 3 and Path(ifbench.files.results).is_file()
        assert strict.accuracy is None or 0.0 <= strict.accuracy <= 100.0
        assert ifbench.generation["max_new_tokens"] == 6  # the AlpacaEval answers' settings
    assert results["sft"].paired_ifbench == PairedVs("sft", is_baseline=True)
    for name in ("dpo", "orpo"):
        paired_ifbench = results[name].paired_ifbench
        assert paired_ifbench is not None and paired_ifbench.baseline == "sft"
        assert paired_ifbench.comparison is not None and paired_ifbench.comparison["n"] <= 3
        low, high = paired_ifbench.comparison["ci95"]
        assert low <= paired_ifbench.comparison["delta"] <= high
    assert "| IFBench (strict, prompt) ± s.e. | Δ IFBench vs Baseline [95% CI] |" in stdout
    dpo_heldout = results["dpo"].evaluation.heldout
    assert dpo_heldout is not None and dpo_heldout.reward_accuracy is not None  # DPO has a reference
    assert dpo_heldout.beta == 0.1  # its loss's beta
    # every model directory carries its card, with this run's eval results; only dpo was (dry-run) uploaded
    from steps.model_card import fmt

    for name, r in results.items():
        card = Path(r.evaluation.model_dir, "README.md").read_text()
        scores = r.evaluation.alpaca_eval.scores
        assert run.pathspec in card and f"| win rate | {fmt(scores.win_rate)} ± " in card, name
        assert "| LC win rate | n/a (" in card  # with the reason it is not shown
    hub = results["dpo"].evaluation.hub
    assert hub is not None and hub.repo_id == "prefflow-test/tiny-dpo" and hub.dry_run
    assert results["orpo"].evaluation.hub is None
    assert "| LC WR | WR | Loss Function | Training Config | Epoch | Model Initialization | Δ WR vs" in stdout
    assert "| ORPO | lr=0.001, orpo_lambda=0.2, nll_scale=1 |" in stdout  # the report's formatting
    join = run["join"].task.data
    assert isinstance(join.run_config, dict) and join.run_config["preference"]["criterion_config"]["beta"] == 0.1
    # typed results, read back with the Client API: the evaluate step's artifact is the join's row
    assert all(isinstance(r, VariantResult) for r in join.results)
    evaluate = {t.data.result.variant: t.data.result for t in run["evaluate"]}
    assert all(isinstance(e, EvalResult) for e in evaluate.values())
    assert evaluate == {name: r.evaluation for name, r in results.items()}
    # the report step's results.json: model_dir relative to the run's output root, named as the config names it
    report = json.loads((tmp_path / "reports" / "results.json").read_text())
    assert [r["output_root"] for r in report["runs"]] == [str(tmp_path / "runs" / "PrefFlow" / run.id)]
    relative = {name: str(Path(r.evaluation.model_dir).relative_to(join.output_root)) for name, r in results.items()}
    assert {row["variant"]: row["model_dir"] for row in report["rows"]} == relative
    ifbench_cells = {row["variant"]: row["ifbench_n_prompts"] for row in report["rows"]}
    assert ifbench_cells == {"sft": 3, "dpo": 3, "orpo": 3}
    assert relative["sft"] == str(Path("sft", "final"))
    # the report step read the typed training results of this run: its training curves are in the report
    assert (tmp_path / "reports" / "plots" / f"training-PrefFlow-{run.id}.png").is_file()


def test_metrics_reach_the_trackers(finished_run):
    """tracking: [tensorboard, mlflow] in the config: the train, dev and eval values read back from each backend."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = finished_run
    summary = next(t.data.train_summary for t in run["preference"].tasks() if t.data.variant["name"] == "dpo")
    result = next(r.evaluation.metrics() for r in run["join"].task.data.results if r.variant == "dpo")
    tracking = Path(summary.model_dir).parents[1] / "tracking"
    events = EventAccumulator(str(next((tracking / "tensorboard").glob("dpo*")))).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([h["loss"] for h in summary.history], rel=1e-6)
    assert events.Scalars("eval/win_rate")[0].value == pytest.approx(result["win_rate"], rel=1e-6)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracking / "mlruns").as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    dpo = next(r for r in runs if r.info.run_name == f"{run.id}/dpo")  # one MLflow run per variant, named by run
    history = client.get_metric_history(dpo.info.run_id, "train/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [h["loss"] for h in summary.history], rel=1e-6
    )
    assert dpo.data.metrics["eval/win_rate"] == pytest.approx(result["win_rate"], rel=1e-6)


def test_training_steps_leave_models_and_metrics(finished_run):
    run, _, _ = finished_run
    summaries = {t.data.variant["name"]: t.data.train_summary for t in run["preference"].tasks()}
    assert set(summaries) == {"sft", "dpo", "orpo"}
    for summary in summaries.values():
        assert (Path(summary.model_dir) / "model.safetensors").exists()
        assert summary.steps == 2 and len(summary.history) == 2
        lines = Path(summary.metrics_path).read_text().splitlines()
        assert json.loads(lines[0])["step"] == 1
    assert summaries["dpo"].reference == summaries["sft"].model_dir
    assert summaries["orpo"].reference is None


def test_training_results_are_typed_artifacts_read_with_the_client_api(finished_run):
    """sft_summary / train_summary are steps.results.TrainResult objects: attributes, and the typed training section
    the step trained with (what the join, the model cards and the evaluate step read)."""
    from metaflow import Run, namespace

    from steps.config import PreferenceConfig, SFTConfig
    from steps.results import TrainResult

    run, _, _ = finished_run
    namespace(None)
    sft = Run(run.pathspec)["sft"].task.data.sft_summary
    assert isinstance(sft, TrainResult) and isinstance(sft.config, SFTConfig) and sft.kind == "sft"
    assert Path(sft.model_dir) == Path(run["start"].task.data.output_root) / "sft" / "final"
    assert (sft.steps, sft.config.max_steps, sft.config.max_seq_len, sft.reference) == (2, 2, 256, None)
    orpo = next(t.data.train_summary for t in run["preference"].tasks() if t.data.variant["name"] == "orpo")
    assert isinstance(orpo.config, PreferenceConfig) and orpo.config.criterion_config.orpo_lambda == 0.2
    assert orpo.loss_beta is None and sft.loss_beta is None  # ORPO has no beta
    dpo = next(t.data.train_summary for t in run["preference"].tasks() if t.data.variant["name"] == "dpo")
    assert dpo.loss_beta == 0.1 and dpo.init_label == "SFT checkpoint" and dpo.init == sft.model_dir
    rows = {r.variant: r for r in run["join"].task.data.results}  # typed VariantResult rows
    assert rows["dpo"].train_steps == dpo.steps and rows["dpo"].evaluation.epoch == dpo.config.epochs == 1
    assert rows["dpo"].training_config["criterion_config"]["beta"] == dpo.config.criterion_config.beta


def test_bad_config_fails_before_any_work(tmp_path):
    import subprocess
    import sys

    bad = _config(tmp_path, TINY_CONFIG.replace("criterion_config: {beta: 0.1}", "criterion_config: {beta: -1}"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "flows" / "pipeline.py"), "--config", "config", str(bad), "run", "--loss", "dpo"],
        cwd=REPO,
        env={**os.environ, **_env(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {bad}: preference.criterion_config.beta: "), proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing was prepared or trained
    assert not (tmp_path / "mf").exists()  # not even a run was created


def test_bad_config_through_runner_raises_before_any_run(tmp_path):
    """Metaflow's Config parser only loads; the flow's preflight is the check, with its one line, before any run."""
    from metaflow import Runner

    bad = _config(tmp_path, TINY_CONFIG.replace("max_new_tokens: 6", "max_new_tokens: 6\n  temprature: 0.5"))
    runner = Runner(
        str(REPO / "flows" / "pipeline.py"),
        show_output=False,
        env=_env(tmp_path),
        cwd=str(REPO),
        config=[("config", str(bad))],
    )
    with pytest.raises(RuntimeError) as err, runner.run(loss="dpo"):
        pass
    assert f"error: {bad}: evaluation.temprature: unknown key (did you mean 'temperature'?)" in str(err.value)
    assert not (tmp_path / "mf").exists()


def test_unknown_loss_through_runner_fails_before_any_run(tmp_path):
    from metaflow import Runner

    runner = Runner(
        str(REPO / "flows" / "pipeline.py"),
        show_output=False,
        env=_env(tmp_path),
        cwd=str(REPO),
        config=[("config", str(_config(tmp_path)))],
    )
    with pytest.raises(RuntimeError) as err, runner.run(loss="dpo,nope"):
        pass
    assert "error: --loss: nope: unknown loss" in str(err.value) and "simpo" in str(err.value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mf").exists()


def test_start_checks_the_parameters_too(tmp_path):
    """Runs started without the command-line preflight (e.g. a deployed flow triggered with bad parameters)."""
    import yaml

    from steps.config import ConfigError
    from steps.pipeline import plan_run

    raw = yaml.safe_load(_config(tmp_path).read_text())
    with pytest.raises(ConfigError, match="--loss: nope: unknown loss"):
        plan_run(raw, "dpo,nope", "", "", "PrefFlow", "1")
    with pytest.raises(ConfigError, match=r"--set: sft\.lr: got 'abc'"):
        plan_run(raw, "dpo", "sft.lr=abc", "", "PrefFlow", "1")


@pytest.mark.parametrize("serialize", [True, False])
def test_cpu_heavy_steps_take_turns(tmp_path, serialize):
    """Without a GPU, a heavy step holds the output root's lock: a second one (another open file) cannot take it."""
    import fcntl

    import torch

    from steps.config import config_from_dict
    from steps.step_context import cpu_heavy_section

    if torch.cuda.is_available():
        pytest.skip("GPU machines run heavy steps side by side")
    cfg = config_from_dict({"resources": {"output_dir": str(tmp_path), "serialize_cpu_steps": serialize}})
    lock = tmp_path / ".cpu-heavy.lock"
    with cpu_heavy_section(cfg, "test"):
        assert lock.exists() == serialize
        if serialize:
            with open(lock, "a+b") as other, pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    if serialize:  # released afterwards
        with open(lock, "a+b") as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
