"""steps.tracking: metrics written through TensorBoard, MLflow (file store) and W&B (offline), read back with each
backend's own reader: TensorBoard's EventAccumulator, the MLflow client, and W&B's run files (its protobuf records).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import sys
from pathlib import Path

import pytest

from steps.tracking import BACKENDS, Tracker, TrackingError

SECRET = "prefflow-test-secret-5f1c9e"
GROUP, RUN = "1700000000000042", "dpo"
CONFIG = {
    "name": "default",
    "preference": {"criterion": "dpo", "lr": 1e-6, "criterion_config": {"beta": 0.1}},
    "deployment": {"hub_token": SECRET},  # secret-looking keys never reach a tracker
}
# what the training loop appends to metrics.jsonl (train) and after an epoch (dev), then the evaluate step's metrics
TRAIN = [
    {"step": 1, "epoch": 0, "lr": 1e-6, "step_time_s": 0.5, "tokens_per_s": 2000.0, "tokens": 1000.0, "loss": 0.6931},
    {"step": 2, "epoch": 0, "lr": 9e-7, "step_time_s": 0.4, "tokens_per_s": 2500.0, "tokens": 1000.0, "loss": 0.6},
    {"step": 3, "epoch": 0, "lr": 5e-7, "step_time_s": 0.4, "tokens_per_s": 2400.0, "tokens": 960.0, "loss": 0.5},
]
DEV = [{"step": 3, "epoch": 0, "dev_loss": 0.55, "dev_reward_accuracy": 0.75, "dev_reward_margin": 0.125}]
EVAL = {
    "win_rate": 45.41,
    "standard_error": 3.2,
    "length_controlled_winrate": 46.79,
    "n_total": 24,
    "judge": "local_logprob:embedded:smollm2-135m-instruct",  # text: not a metric
    "weak_judge": True,  # boolean: not a metric
    "generation": {"seconds": 12.5, "max_new_tokens": 256},
}
EXPECTED = {
    **{(f"train/{k}", r["step"]): float(v) for r in TRAIN for k, v in r.items() if k != "step"},
    ("dev/epoch", 3): 0.0,
    ("dev/loss", 3): 0.55,  # the loop's dev_ keys, not prefixed twice
    ("dev/reward_accuracy", 3): 0.75,
    ("dev/reward_margin", 3): 0.125,
    ("eval/win_rate", 0): 45.41,
    ("eval/standard_error", 0): 3.2,
    ("eval/length_controlled_winrate", 0): 46.79,
    ("eval/n_total", 0): 24.0,
    ("eval/generation/seconds", 0): 12.5,
    ("eval/generation/max_new_tokens", 0): 256.0,
}


def write_run(log_dir: Path, backends: list[str]) -> None:
    """A training step's tracker (train and dev), then the evaluate step's (same group and run name)."""
    with Tracker(backends, run_name=RUN, group=GROUP, log_dir=log_dir, config=CONFIG) as tracker:
        for record in TRAIN:
            tracker.log(record, step=record["step"], prefix="train")
        for record in DEV:
            tracker.log({"split": "dev", **record}, step=record["step"], prefix="dev")
    with Tracker(backends, run_name=RUN, group=GROUP, log_dir=log_dir, config=CONFIG) as tracker:
        tracker.log(EVAL, step=0, prefix="eval")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the tracker opts in; put back afterwards
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_API_KEY", SECRET)  # read by wandb itself; must not end up in any file
        mp.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
        write_run(log_dir, list(BACKENDS))
    return log_dir


def approx(expected: dict) -> dict:
    return {k: pytest.approx(v, rel=1e-6) for k, v in expected.items()}  # TensorBoard stores float32


# ----------------------------------------------------------------------------------------- reading back


def read_tensorboard(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((log_dir / "tensorboard").iterdir())
    assert [r.name for r in runs] == [RUN]
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_tensorboard_values_read_back(logged):
    assert read_tensorboard(logged) == approx(EXPECTED)


def mlflow_run(log_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(log_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("prefflow")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the evaluate step added to the training step's run
    return client, runs[0]


def test_mlflow_values_read_back(logged):
    client, run = mlflow_run(logged)
    values = {
        (key, m.step): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)
    }
    assert values == EXPECTED
    assert run.info.run_name == f"{GROUP}/{RUN}" and run.info.status == "FINISHED"
    assert run.data.tags["prefflow.group"] == GROUP and run.data.tags["prefflow.run"] == RUN
    assert run.data.params == {
        "name": "default",
        "preference.criterion": "dpo",
        "preference.lr": "1e-06",
        "preference.criterion_config.beta": "0.1",
    }


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-<id>.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log framing (32 KiB blocks; per chunk CRC32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_values_read_back(logged):
    files = sorted((logged / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the training step's and the evaluate step's, one run id
    values, run_ids, config = {}, set(), {}
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
                assert record.run.display_name == f"{GROUP}/{RUN}" and record.run.run_group == GROUP
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                values.update({(k, row["_step"]): v for k, v in row.items() if not k.startswith("_")})
    assert run_ids == {f"{GROUP}-{RUN}"}
    assert values == EXPECTED
    assert config["preference"] == CONFIG["preference"] and "hub_token" not in json.dumps(config)


def test_secrets_are_in_no_written_file(logged):
    leaked = [p for p in logged.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert any(logged.rglob("*.wandb")) and any((logged / "mlruns").rglob("meta.yaml"))  # there were files


# ---------------------------------------------------------------------------------------- the edges


def test_no_backends_is_a_no_op(tmp_path):
    tracker = Tracker([], run_name=RUN, log_dir=tmp_path / "t")
    tracker.log(TRAIN[0], step=1, prefix="train")
    tracker.close()
    assert not tracker.enabled and not (tmp_path / "t").exists()


@pytest.mark.parametrize(("backends", "message"), [(["neptune"], "unknown backend 'neptune'"), ("mlflow", "a list")])
def test_bad_backend_lists_are_rejected(tmp_path, backends, message):
    with pytest.raises(TrackingError, match=message):
        Tracker(backends, run_name=RUN, log_dir=tmp_path)


@pytest.mark.parametrize(("backend", "package"), [(name, pkg) for name, (_module, pkg) in BACKENDS.items()])
def test_missing_package_is_named(tmp_path, monkeypatch, backend, package):
    monkeypatch.setitem(sys.modules, BACKENDS[backend][0], None)  # what Python does for an absent module
    with pytest.raises(TrackingError, match=rf"needs the '{package}' package.*prefflow\[tracking\]"):
        Tracker([backend], run_name=RUN, log_dir=tmp_path)


def test_a_rank_other_than_zero_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # torchrun's variable, before torch.distributed is initialised
    with Tracker(["tensorboard", "mlflow"], run_name=RUN, log_dir=tmp_path / "t") as tracker:
        tracker.log(TRAIN[0], step=1, prefix="train")
    assert tracker.rank == 1 and not (tmp_path / "t").exists()


def _rank_worker(rank: int, store: str, log_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        with Tracker(["tensorboard"], run_name=RUN, group=GROUP, log_dir=log_dir) as tracker:
            tracker.log({"loss": 1.0 + rank}, step=1, prefix="train")
    finally:
        dist.destroy_process_group()


def test_only_rank_zero_logs_under_torch_distributed(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.delenv("RANK", raising=False)
    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), str(tmp_path / "t")), nprocs=2)
    assert read_tensorboard(tmp_path / "t") == {("train/loss", 1): 1.0}  # rank 0's value, once


def test_a_failing_backend_does_not_stop_training(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    tracker = Tracker(["mlflow", "tensorboard"], run_name=RUN, log_dir=tmp_path)
    shutil.rmtree(tmp_path / "mlruns")  # the store vanishes under a running job
    with caplog.at_level(logging.WARNING, logger="steps.tracking"):
        for record in TRAIN:
            tracker.log(record, step=record["step"], prefix="train")
        tracker.close()
    failures = [r.getMessage() for r in caplog.records if "failed to log" in r.getMessage()]
    assert len(failures) == 1 and failures[0].startswith("tracking: mlflow failed to log step 1")  # warned once
    assert any("failed on 3 log calls" in r.getMessage() for r in caplog.records)
    tensorboard = read_tensorboard(tmp_path)  # the other backend kept every step
    assert sorted(step for tag, step in tensorboard if tag == "train/loss") == [1, 2, 3]


def test_mlflow_tracking_uri_from_the_environment_is_used(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    elsewhere = (tmp_path / "server-store").resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with Tracker(["mlflow"], run_name=RUN, log_dir=tmp_path / "t") as tracker:
        tracker.log({"loss": 0.25}, step=7, prefix="train")
    assert not (tmp_path / "t" / "mlruns").exists()
    client = MlflowClient(tracking_uri=elsewhere.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("prefflow").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(7, 0.25)]
