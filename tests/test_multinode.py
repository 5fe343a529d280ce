"""Scale-out pieces without a flow run: the datastore handoff (byte-identical round trips, verified downloads), the
config and mutator rules for gangs, the HSDP mesh, and gangs of real processes: 2 nodes x 2 ranks of HSDP train
like one process with their checkpoint shards synced through a datastore, and a failed node stops the gang."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
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
        ({"gang_join_timeout_s": 0}, "resources.gang_join_timeout_s", "must be >= 1 (seconds) or null"),
        ({"env": {"LD_PRELOAD": "/x.so"}}, "resources.env.LD_PRELOAD", "allowed: NCCL_*, TORCH_NCCL_*"),
        ({"env": {"nccl_debug": "INFO"}}, "resources.env.nccl_debug", "upper-case letters"),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "resources.env.AWS_SECRET_ACCESS_KEY", "no secrets"),
        ({"env": {"NCCL_API_TOKEN": "x"}}, "resources.env.NCCL_API_TOKEN", "no secrets"),
        ({"env": {"NCCL_DEBUG": ["INFO"]}}, "resources.env.NCCL_DEBUG", "expected a string or an integer"),
    ],
)
def test_bad_scale_out_settings_name_the_key(resources, key, says):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"resources": resources})
    assert err.value.key == key and says in str(err.value)


def test_env_takes_nccl_and_fabric_settings_as_strings():
    env = {"NCCL_SOCKET_IFNAME": "eth0", "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": 1, "NCCL_DEBUG": "INFO"}
    env |= {"OFI_NCCL_DISABLE_GDR_REQUIRED_CHECK": 0, "TORCH_NCCL_ASYNC_ERROR_HANDLING": 3, "GLOO_SOCKET_IFNAME": "lo"}
    resources = config_from_dict({"resources": {"env": env}}).resources
    assert resources.env_vars() == {name: str(value) for name, value in env.items()}
    assert resources.env_vars()["FI_EFA_USE_DEVICE_RDMA"] == "1"  # YAML's number, as the environment takes it
    assert config_from_dict({}).resources.env_vars() == {}
    overridden = config_from_dict({}, "cfg.yaml", {"resources.env.NCCL_IB_HCA": "mlx5_0,mlx5_1"}).resources
    assert overridden.env_vars() == {"NCCL_IB_HCA": "mlx5_0,mlx5_1"}


def test_torchruns_ranks_get_the_configs_env_over_the_callers(tmp_path, monkeypatch, capfd):
    """resources.env reaches the ranks torchrun starts, over the caller's own value: gloo is told to use an interface
    this machine lacks (the caller says lo, which works), so the rank's process group fails naming it."""
    from steps.train.launch import launch_torchrun

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = config_from_dict({"model": {"base": "tiny"}, "resources": {"env": {"GLOO_SOCKET_IFNAME": "nonexistent0"}}})
    with pytest.raises(GangFailedError, match="this node failed: torchrun exited with code 1"):
        launch_torchrun(cfg, "sft", str(tmp_path / "data"), str(tmp_path / "out"), None, 1)
    assert "Unable to find address for: nonexistent0" in capfd.readouterr().err


def test_the_join_wait_is_short_on_one_machine_and_longer_across_machines():
    assert config_from_dict({}).resources.join_timeout_s(across_machines=False) == 90
    assert config_from_dict({}).resources.join_timeout_s(across_machines=True) == 600
    set_to = config_from_dict({"resources": {"gang_join_timeout_s": 30}}).resources
    assert set_to.join_timeout_s(False) == set_to.join_timeout_s(True) == 30


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
        "onpolicy_round": "train",  # samples, judges, trains and evaluates a round (one node: rounds refuse gangs)
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


def test_node_0_names_the_node_that_never_joins_when_the_wait_is_up(tmp_path):
    """A gang of 3 on a real store: node 1 joins, node 2 never comes; node 0 fails at its join timeout naming node 2
    only; with every node there the plan reaches them."""
    from steps.train.gang import GangCoordinator

    port = local_port("test-join", tmp_path)
    main = GangCoordinator(Gang(3, 0, "127.0.0.1", port), 30, join_timeout_s=3)
    GangCoordinator(Gang(3, 1, "127.0.0.1", port), 30)  # joins at once (a client in this process)
    started = time.monotonic()
    with pytest.raises(GangFailedError) as err:
        main.publish_plan({"resume_from": None})
    took = time.monotonic() - started
    assert re.fullmatch(
        r"gang: node 2 of 3 never joined \(waited [34] s of 3\): it did not reach this machine's gang store \(see "
        r"its log; raise resources.gang_join_timeout_s\)",
        str(err.value),
    ), str(err.value)
    assert 2.5 < took < 10
    third = GangCoordinator(Gang(3, 2, "127.0.0.1", port), 30)
    main.publish_plan({"resume_from": "step_1"})
    assert third.wait_plan(timeout_s=5) == {"resume_from": "step_1"}


def _flow_task(task_id: str, code: str) -> subprocess.Popen:
    """A child process of this one whose command line names a Metaflow task id, as Metaflow's local runtime starts
    a gang's node k (``python flow.py step ... --task-id <control>_node_<k>``)."""
    return subprocess.Popen([sys.executable, "-c", code, "step", "train", "--task-id", task_id])


def test_a_local_node_whose_task_exited_fails_the_gang_at_once_naming_the_wrong_python(tmp_path, monkeypatch):
    """Node 1's task died at start (as at ``import metaflow`` under another interpreter): node 0 says so within
    seconds, not at its join timeout, and names the `python` on PATH that is not this interpreter."""
    from steps.train.gang import GangCoordinator

    other = tmp_path / "other"
    other.mkdir()
    (other / "python").symlink_to(os.path.realpath(sys.executable))  # the venv's base interpreter: not the venv
    monkeypatch.setenv("PATH", str(other))
    worker = _flow_task("7_node_1", "import sys; sys.exit(1)")
    try:
        gang = Gang(2, 0, "127.0.0.1", local_port("test-exited", tmp_path), control_task="PrefFlow/3/sft_nodes/7")
        started = time.monotonic()
        with pytest.raises(GangFailedError) as err:
            GangCoordinator(gang, 30, join_timeout_s=60).publish_plan({})
        assert time.monotonic() - started < 10
    finally:
        worker.wait(timeout=30)
    message = str(err.value)
    assert re.match(r"gang: node 1 of 2 never joined \(waited \d s of 60\): its task ", message), message
    assert message.split("): its task ", 1)[1].startswith(
        "PrefFlow/3/sft_nodes/7_node_1 exited before joining (its error is in this step's log above); Metaflow starts "
        f"a local gang's other nodes as `python` from PATH: that is {other / 'python'}, not this interpreter "
        f"({sys.executable}); activate its environment"
    ), message


def test_a_local_node_whose_task_dies_after_joining_stops_the_gang(tmp_path):
    """Node 1's task joins, then its process ends without reporting (as when killed): node 0's run_node stops its
    own job (2 minutes long) within seconds, naming node 1's task, instead of waiting for torchrun's rendezvous."""
    from steps.train.gang import GangCoordinator, run_node

    port = local_port("test-vanished", tmp_path)
    joins = f"from steps.train.gang import Gang, GangCoordinator; GangCoordinator(Gang(2, 1, '127.0.0.1', {port}), 30)"
    worker = _flow_task("8_node_1", joins)
    try:
        coordinator = GangCoordinator(Gang(2, 0, "127.0.0.1", port, control_task="PrefFlow/5/sft_nodes/8"), 30, 60)
        coordinator.publish_plan({})
        started = time.monotonic()
        with pytest.raises(GangFailedError) as err:
            run_node([sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ), coordinator.gang,
                     coordinator, poll_s=0.2)  # fmt: skip
        assert time.monotonic() - started < 30
    finally:
        worker.wait(timeout=60)
    assert str(err.value) == (
        "gang failed: node 1 of 2 failed: its task PrefFlow/5/sft_nodes/8_node_1 exited without reporting (its error "
        "is in this step's log)"
    )


def test_a_local_node_still_starting_at_the_timeout_is_named_and_ended(tmp_path):
    """Node 1's task is alive but never joins (stopped: a hung start): node 0 gives up at its join timeout and ends
    that task, which would otherwise outlive the gang and hold the step's log open."""
    from steps.train.gang import GangCoordinator

    worker = _flow_task("9_node_1", "import time; time.sleep(120)")
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        gang = Gang(2, 0, "127.0.0.1", local_port("test-slow", tmp_path), control_task="PrefFlow/4/sft_nodes/9")
        with pytest.raises(GangFailedError, match=r"^gang: node 1 of 2 never joined \(waited [23] s of 2\): its task "
                           r"PrefFlow/4/sft_nodes/9_node_1 was still starting; node 0 ended it \(a busy machine\? "
                           r"raise resources.gang_join_timeout_s\)$"):  # fmt: skip
            GangCoordinator(gang, 30, join_timeout_s=2).publish_plan({})
        assert worker.wait(timeout=5) == -signal.SIGTERM  # ended by node 0 (SIGTERM and SIGCONT), not by the test
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)


def test_a_gangs_python_is_this_interpreter_where_its_directory_has_one(tmp_path):
    from steps.train.gang import put_own_python_first, worker_python_problem

    venv_bin = os.path.dirname(sys.executable)
    environ = {"PATH": "/usr/bin:/bin"}
    assert put_own_python_first(environ) is True
    assert environ["PATH"] == f"{venv_bin}:/usr/bin:/bin"
    assert put_own_python_first(environ) is True and environ["PATH"] == f"{venv_bin}:/usr/bin:/bin"  # once
    assert worker_python_problem(environ) is None
    lone = tmp_path / "lone"  # an interpreter whose directory has no `python`: PATH stays, the problem is named
    lone.mkdir()
    (lone / "python3").symlink_to(sys.executable)
    environ = {"PATH": str(tmp_path / "empty")}
    assert put_own_python_first(environ, str(lone / "python3")) is False and environ == {
        "PATH": str(tmp_path / "empty")
    }
    assert worker_python_problem(environ) == (
        "Metaflow starts a local gang's other nodes as `python` from PATH, which has none (this interpreter is "
        f"{sys.executable}); activate its environment (e.g. `source .venv/bin/activate`) or put a directory whose "
        f"`python` is {sys.executable} first on PATH"
    )


@pytest.mark.parametrize(
    ("argv", "stops"),
    [
        (["run", "--set", "resources.num_nodes=2"], True),
        (["run", "--set", "resources.num_nodes=1"], False),
        (["run", "--set", "resources.num_nodes=2 resources.kubernetes=true"], False),
        (["--with", "kubernetes", "run", "--set", "resources.num_nodes=2"], False),
        (["argo-workflows", "create", "--set", "resources.num_nodes=2"], False),
    ],
)
def test_the_preflight_stops_a_local_gang_whose_nodes_would_not_run_this_python(
    argv, stops, tmp_path, monkeypatch, capsys
):
    from steps.config import preflight

    monkeypatch.setenv("PATH", str(tmp_path))  # no `python` at all
    assert preflight(argv) == (2 if stops else 0)
    err = capsys.readouterr().err
    if stops:
        assert err.count("\n") == 1 and err.startswith(
            "error: resources.num_nodes: is 2: Metaflow starts a local gang's other nodes as `python` from PATH, "
            "which has none (this interpreter is"
        ), err


def _hsdp_node(node_index: int, port: int, data_dir: str, root: str, raw: dict) -> None:
    import logging

    logging.basicConfig(level=logging.INFO)
    from steps.config import config_from_dict, for_loss
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
    summary = launch(
        for_loss(config_from_dict(raw), "dpo"),
        "dpo",
        data_dir,
        str(local),
        nproc_per_node=2,
        node=NodeRun(gang, coordinator, sync),
    )
    Path(root, f"summary{node_index}.json").write_text(json.dumps(summary.to_dict() if summary else None))


def test_two_nodes_of_two_ranks_train_hsdp_like_one_process(tmp_path, tokenizer):
    """fsdp on a gang of 2 nodes x 2 ranks: mesh (replicate 2, shard 2); the same loss and weights as 1 process
    with the same global batch, and each node's checkpoint shards reach the datastore though no disk is shared."""
    import torch
    from safetensors.torch import load_file

    from steps.config import config_from_dict, for_loss
    from steps.io import write_jsonl
    from steps.results import TrainResult
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
    one = launch(for_loss(config_from_dict(raw(4)), "dpo"), "dpo", str(data), str(tmp_path / "one"), nproc_per_node=1)
    port = local_port("test-hsdp", tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hsdp_node, args=(i, port, str(data), str(tmp_path), raw(1))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=400)
    assert [p.exitcode for p in procs] == [0, 0]
    two = TrainResult.from_dict(json.loads((tmp_path / "summary0.json").read_text()))
    assert json.loads((tmp_path / "summary1.json").read_text()) is None  # rank 0 ran on node 0
    assert two.layout == {"parallelism": "fsdp", "world_size": 4, "nodes": 2, "mesh": [2, 2],
                          "mesh_dims": ["replicate", "shard"]}  # fmt: skip
    assert one.steps == two.steps == 2
    for a, b in zip(one.history, two.history):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    x, y = (load_file(Path(s.model_dir) / "model.safetensors") for s in (one, two))
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
