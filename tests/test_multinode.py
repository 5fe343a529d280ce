"""Scale-out pieces without a flow run: the datastore handoff (byte-identical round trips, verified downloads), the
config and mutator rules for gangs, the HSDP mesh, and gangs of real processes: 2 nodes x 2 ranks of HSDP train
like one process with their checkpoint shards synced through a datastore, and a failed node stops the gang."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import pytest

from steps.config import ConfigError, config_from_dict
from steps.model_store import HandoffError, ModelStore, StoreLocation
from steps.train.gang import Gang, GangFailedError, local_port, torchrun_node_args, visible_devices_for
from steps.train.parallel import fsdp_mesh_shape, node_layout

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "flows"))  # the flows import their mutators as a top-level module

from mutators import GANG_STEPS, NODES_LABEL, OUTPUT_STEPS, kubernetes_kwargs, step_roles  # noqa: E402


def _store(tmp_path: Path) -> ModelStore:
    root = tmp_path / "runs" / "PrefFlow" / "42"
    root.mkdir(parents=True)
    return ModelStore(StoreLocation("local", str(tmp_path / "datastore"), "PrefFlow/prefflow_handoff/42", str(root)))


def _model_dir(path: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 8}',
        "model.safetensors": os.urandom(3 << 20) + b"\x00tail",
        "tokenizer/vocab.txt": b"a\nb\nc\n",
        "empty.bin": b"",
    }
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return files


def test_a_pushed_directory_comes_back_byte_identical(tmp_path):
    store = _store(tmp_path)
    model = store.root / "sft" / "final"
    files = _model_dir(model)
    manifest = store.push(model)
    assert manifest["files"] == {
        rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in files.items()
    }
    stored = tmp_path / "datastore" / "PrefFlow" / "prefflow_handoff" / "42" / "sft" / "final"
    assert (stored / "model.safetensors").read_bytes() == files["model.safetensors"]  # raw bytes: no pickling
    import shutil

    shutil.rmtree(store.root)  # a pod that shares nothing with the one that trained
    assert store.pull(model) is True
    assert {p.relative_to(model).as_posix(): p.read_bytes() for p in model.rglob("*") if p.is_file()} == files
    assert store.pull(model) is False  # already here: nothing downloaded
    assert not list(model.parent.glob(".final.pull-*"))  # the temp copy was renamed into place


def test_a_single_file_and_the_directory_around_a_file(tmp_path):
    store = _store(tmp_path)
    refs = store.root / "eval" / "reference_outputs.json"
    refs.parent.mkdir(parents=True)
    refs.write_text('[{"output": "hi"}]')
    store.push(refs)
    annotations = store.root / "eval" / "dpo" / "annotations.json"
    annotations.parent.mkdir(parents=True)
    annotations.write_text("[1, 2]")
    (annotations.parent / "metrics.json").write_text("{}")
    store.push(annotations.parent)
    import shutil

    shutil.rmtree(store.root / "eval")
    assert store.ensure(refs).read_text() == '[{"output": "hi"}]'
    assert store.ensure(annotations).read_text() == "[1, 2]"  # pulled with its directory, which was pushed
    assert (annotations.parent / "metrics.json").read_text() == "{}"


def test_a_corrupted_upload_fails_the_download(tmp_path):
    store = _store(tmp_path)
    model = store.root / "dpo" / "final"
    _model_dir(model)
    store.push(model)
    stored = tmp_path / "datastore" / "PrefFlow" / "prefflow_handoff" / "42" / "dpo" / "final" / "model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"X")  # same size, one byte changed
    import shutil

    shutil.rmtree(model)
    with pytest.raises(HandoffError, match=r"model\.safetensors: downloaded .* SHA-256 .* the manifest says"):
        store.pull(model)
    assert not model.exists() and not list(model.parent.glob(".final.pull-*"))  # nothing half-done left


def test_what_was_never_pushed_is_named(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(HandoffError, match=r"sft/final: not here and not in the datastore .*manifest\.json missing"):
        store.pull(store.root / "sft" / "final")
    with pytest.raises(HandoffError, match="not under the run's output root"):
        store.key_for(tmp_path / "elsewhere")
    assert store.pull(store.root / "sft" / "final", required=False) is False


@pytest.mark.parametrize(
    ("resources", "handoff"),
    [
        ({}, "shared"),
        ({"kubernetes": True}, "datastore"),
        ({"kubernetes": True, "persistent_volume_claim": "runs", "output_dir": "/mnt/runs"}, "shared"),
        ({"model_store": "datastore"}, "datastore"),
        (
            {"kubernetes": True, "model_store": "datastore", "persistent_volume_claim": "r", "output_dir": "/r"},
            "datastore",
        ),
    ],
)
def test_model_store_auto_is_the_datastore_on_kubernetes_without_a_volume(resources, handoff):
    assert config_from_dict({"resources": resources}).resources.handoff() == handoff


@pytest.mark.parametrize(
    ("resources", "key", "says"),
    [
        ({"num_nodes": 0}, "resources.num_nodes", "must be >= 1"),
        ({"persistent_volume_claim": "runs"}, "resources.persistent_volume_claim", "resources.kubernetes: true"),
        ({"kubernetes": True, "persistent_volume_claim": "runs"}, "resources.output_dir", "absolute path"),
        ({"kubernetes": True, "model_store": "shared"}, "resources.model_store", "set persistent_volume_claim"),
        ({"train": {"memory": 1000, "shared_memory": 2000}}, "resources.train.shared_memory", "at most memory"),
        ({"master_port": 65535}, "resources.master_port", "the next port is used too"),
    ],
)
def test_bad_scale_out_settings_name_the_key(resources, key, says):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"resources": resources})
    assert err.value.key == key and says in str(err.value)


def test_shared_memory_defaults_to_a_quarter_of_memory_with_gpus_only():
    cfg = config_from_dict({"resources": {"train": {"memory": 64000, "gpu": 8}, "evaluate": {"memory": 8000}}})
    assert cfg.resources.train.shared_memory_mb() == 16000
    assert cfg.resources.evaluate.shared_memory_mb() is None


def test_training_resources_go_to_the_gang_steps_with_a_gang():
    assert step_roles(1) == {
        "reference_outputs": "evaluate",
        "evaluate": "evaluate",
        "sft": "train",
        "preference": "train",
        "sft_nodes": "train",
        "preference_nodes": "train",
    }
    assert step_roles(2) == {"reference_outputs": "evaluate", "evaluate": "evaluate"} | dict.fromkeys(
        GANG_STEPS, "train"
    )


def test_kubernetes_gets_the_volume_on_output_steps_and_the_port_on_gang_steps():
    res = config_from_dict(
        {
            "resources": {
                "kubernetes": True,
                "persistent_volume_claim": "prefflow-runs",
                "output_dir": "/mnt/prefflow",
                "num_nodes": 2,
                "master_port": 29600,
                "train": {"gpu": 8, "memory": 64000},
            }
        }
    ).resources
    gang = kubernetes_kwargs(res, "sft_nodes", res.train)
    assert gang == {
        "cpu": 2,
        "memory": 64000,
        "gpu": 8,
        "persistent_volume_claims": {"prefflow-runs": "/mnt/prefflow"},
        "port": 29600,
        "labels": {NODES_LABEL: "2"},
    }
    assert kubernetes_kwargs(res, "prepare_data", None) == {
        "persistent_volume_claims": {"prefflow-runs": "/mnt/prefflow"}
    }
    assert kubernetes_kwargs(res, "sft_gang", None) == {}
    assert {"start", "sft_gang", "preference_gang", "report", "end"}.isdisjoint(OUTPUT_STEPS)


@pytest.mark.parametrize(
    ("world", "local", "layout", "mesh"),
    [(8, None, (1, 8), (8,)), (16, "8", (2, 8), (2, 8)), (2, "1", (2, 1), (2, 1)), (1, "1", (1, 1), (1,))],
)
def test_gangs_shard_within_a_node_and_replicate_across(monkeypatch, world, local, layout, mesh):
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert node_layout(world) == layout
    assert fsdp_mesh_shape(*layout) == mesh


def test_uneven_nodes_are_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="not a multiple of LOCAL_WORLD_SIZE 3"):
        node_layout(8)


def test_rendezvous_is_torchruns_static_one_with_metaflows_node_ranks():
    gang = Gang(num_nodes=4, node_index=2, main_ip="10.0.0.7", port=29500)
    assert torchrun_node_args(gang, 8, 1800) == [
        "--nnodes=4",
        "--node-rank=2",
        "--nproc-per-node=8",
        "--master-addr=10.0.0.7",
        "--master-port=29500",
        "--rdzv-conf=timeout=1800",
        "--max-restarts=0",
    ]
    ports = {local_port("run", "sft_nodes", task, 0) for task in range(200)}
    assert all(20000 <= p < 45000 - 1 for p in ports) and len(ports) > 190  # gangs rarely collide
    assert local_port("r", "s", 1, 0) == local_port("r", "s", 1, 0) != local_port("r", "s", 1, 1)  # each attempt anew


def test_nodes_of_a_local_gang_get_their_own_gpus():
    local = Gang(num_nodes=2, node_index=1, main_ip="127.0.0.1", port=1)
    assert visible_devices_for(local, 2, 4) == "2,3"
    assert visible_devices_for(local, 2, 0) is None  # CPU: gloo
    assert visible_devices_for(Gang(2, 1, "10.1.1.1", 1), 2, 4) is None  # its own machine
    with pytest.raises(GangFailedError, match="needs 4 GPUs on this machine, found 3"):
        visible_devices_for(local, 2, 3)


# ----- gangs of real processes ---------------------------------------------------------------------------------


def _failing_node(node_index: int, port: int, out: str) -> None:
    from steps.train.gang import GangCoordinator, run_node

    gang = Gang(num_nodes=2, node_index=node_index, main_ip="127.0.0.1", port=port)
    coordinator = GangCoordinator(gang, 60)
    cmd = [sys.executable, "-c", "import time; time.sleep(120)"]
    if node_index == 1:
        cmd = [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"]
    started = time.monotonic()
    try:
        run_node(cmd, dict(os.environ), gang, coordinator, poll_s=0.2)
        message = "no error"
    except GangFailedError as exc:
        message = str(exc)
    Path(out, f"node{node_index}.json").write_text(json.dumps([message, time.monotonic() - started]))


def test_a_failed_node_stops_the_whole_gang_with_its_error(tmp_path):
    port = local_port("test", tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_failing_node, args=(i, port, str(tmp_path))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    messages = {i: json.loads((tmp_path / f"node{i}.json").read_text()) for i in range(2)}
    for i, (message, _) in messages.items():
        assert "node 1 of 2 failed: torchrun exited with code 3" in message, (i, message)
    assert messages[0][1] < 60  # node 0 stopped its own job (2 minutes long) instead of waiting it out


def _store_reached_after(port: int, out: str) -> None:
    from steps.train.gang import GangCoordinator

    coordinator = GangCoordinator(Gang(2, 1, "127.0.0.1", port), 30)
    try:
        coordinator.wait_plan()
        Path(out).write_text("got a plan")
    except GangFailedError as exc:
        Path(out).write_text(str(exc))


def test_a_node_waiting_for_node_0_learns_at_once_that_it_died(tmp_path):
    import torch.distributed as dist

    port = local_port("test-wait", tmp_path)
    server = dist.TCPStore("127.0.0.1", port + 1, is_master=True, wait_for_workers=False)
    proc = mp.get_context("spawn").Process(target=_store_reached_after, args=(port, str(tmp_path / "out")))
    proc.start()
    time.sleep(8)  # node 1 is waiting for the plan
    started = time.monotonic()
    del server  # node 0's process ends
    proc.join(timeout=60)
    assert time.monotonic() - started < 30
    assert "lost the gang's store on node 0 while waiting for node 0's start plan" in (tmp_path / "out").read_text()


def _hsdp_node(node_index: int, port: int, data_dir: str, root: str, raw: dict) -> None:
    import logging

    logging.basicConfig(level=logging.INFO)
    from steps.train.checkpoint_sync import CheckpointSync
    from steps.train.gang import GangCoordinator
    from steps.train.launch import NodeRun, launch

    gang = Gang(num_nodes=2, node_index=node_index, main_ip="127.0.0.1", port=port)
    store = ModelStore(StoreLocation("local", f"{root}/datastore", "T/prefflow_handoff/1", f"{root}/runs/T/1"))
    canonical = Path(root, "runs/T/1/dpo")
    local = canonical if node_index == 0 else Path(root, f"node{node_index}/dpo")  # disks not shared
    coordinator = GangCoordinator(gang, 120)
    sync = CheckpointSync(store, local, canonical, gang, coordinator)
    if node_index == 0:
        coordinator.publish_plan(sync.prepare())
    else:
        sync.prepare(coordinator.wait_plan())
    summary = launch(raw, "dpo", data_dir, str(local), nproc_per_node=2, node=NodeRun(gang, coordinator, sync))
    Path(root, f"summary{node_index}.json").write_text(json.dumps(summary))


def test_two_nodes_of_two_ranks_train_hsdp_like_one_process(tmp_path, tokenizer):
    """fsdp on a gang of 2 nodes x 2 ranks: mesh (replicate 2, shard 2); the same loss and weights as 1 process
    with the same global batch, and each node's checkpoint shards reach the datastore though no disk is shared."""
    import torch
    from safetensors.torch import load_file

    from steps.io import write_jsonl
    from steps.train.launch import launch
    from tests.test_train import TOPICS_TRAIN, pair_rows

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "preference.train.jsonl", pair_rows(TOPICS_TRAIN))

    def raw(grad_accum: int) -> dict:
        preference = {"criterion": "dpo", "criterion_config": {"beta": 0.1}, "lr": 2e-3, "max_num_tokens": 200}
        preference |= {"max_seq_len": 200, "grad_accum": grad_accum, "seed": 3, "dev_every_epoch": False}
        preference |= {"parallelism": "fsdp", "checkpoint_every_steps": 1}
        return {
            "name": "hsdp_test",
            "model": {"base": "tiny", "dtype": "float32"},
            "preference": preference,
            "resources": {"process_group_timeout_s": 120},
        }

    os.environ["OMP_NUM_THREADS"] = "1"
    one = launch(raw(4), "dpo", str(data), str(tmp_path / "one"), nproc_per_node=1)
    port = local_port("test-hsdp", tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hsdp_node, args=(i, port, str(data), str(tmp_path), raw(1))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=400)
    assert [p.exitcode for p in procs] == [0, 0]
    two = json.loads((tmp_path / "summary0.json").read_text())
    assert json.loads((tmp_path / "summary1.json").read_text()) is None  # rank 0 ran on node 0
    assert two["layout"] == {"parallelism": "fsdp", "world_size": 4, "nodes": 2, "mesh": [2, 2],
                             "mesh_dims": ["replicate", "shard"]}  # fmt: skip
    assert one["steps"] == two["steps"] == 2
    for a, b in zip(one["history"], two["history"]):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    x, y = (load_file(Path(s["model_dir"]) / "model.safetensors") for s in (one, two))
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=0, msg=key)
    # the last checkpoint is in the datastore, complete from both nodes: node 0 with DCP's metadata and its ranks'
    # shards (0, 1), node 1 with its ranks' shards (2, 3); node 1 kept none on its own disk
    parts = tmp_path / "datastore" / "T" / "prefflow_handoff" / "1" / "dpo" / "checkpoints" / "step_0000002"
    node0 = json.loads((parts / "node_0.manifest.json").read_text())["files"]
    node1 = json.loads((parts / "node_1.manifest.json").read_text())["files"]
    assert {"COMPLETE", "state/.metadata", "state/__0_0.distcp", "state/__1_0.distcp"} <= set(node0)
    assert {"rng/rank_0.pt", "rng/rank_1.pt", "trainer_state.pt"} <= set(node0)
    assert set(node1) == {"state/__2_0.distcp", "state/__3_0.distcp", "rng/rank_2.pt", "rng/rank_3.pt"}
    assert not list((tmp_path / "node1" / "dpo" / "checkpoints").glob("*step_*"))
