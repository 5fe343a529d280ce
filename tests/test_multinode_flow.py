"""Real flow runs with ``resources.num_nodes: 2`` (local @parallel gangs, gloo on CPU): SFT and DPO gangs match one
process within 1e-5 (DDP; HSDP 2 x 1); with the datastore handoff and every step's local output wiped, a killed rank
fails the gang, @retry resumes every node from the last checkpoint and ``resume`` finishes with the same weights;
the README's gang command runs without an activated venv, and a node that never joins fails the gang fast."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from steps.results import TrainResult
from tests.faults import KILL_RANK_ENV, WIPE_ENV, hooks_env
from tests.test_flow import _env as flow_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

CONFIG = """
name: tiny_gang
data: {input: embedded, max_trees: 14, dev_fraction: 0.2}
model: {base: tiny, dtype: float32}
sft: {lr: 1.0e-3, max_num_tokens: 1024, max_batch_examples: 2, max_seq_len: 256, overlength: truncate,
      max_steps: 3, warmup_steps: 0, checkpoint_every_steps: 1}
preference: {criterion: dpo, criterion_config: {beta: 0.1}, lr: 1.0e-3, max_num_tokens: 1024, max_batch_examples: 4,
             max_seq_len: 256, overlength: truncate, max_steps: 2}
evaluation: {enabled: false}
resources: {output_dir: OUTPUT_DIR, process_group_timeout_s: 120}
"""
#: Every rank takes grad_accum micro-batches per step: 2 nodes x 1 rank x 1 = 1 process x 2.
GANG = "resources.num_nodes=2 resources.nproc_per_node=1"


def _env(tmp_path: Path, **extra: str) -> dict:
    """test_flow's environment, plus the venv's interpreter first on PATH: a gang's worker tasks are started as
    ``python flow.py step ...``."""
    return {
        **flow_env(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


def _config(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "tiny_gang.yaml"
    path.write_text(text.replace("OUTPUT_DIR", str(tmp_path / "runs")))
    return path


def _run(tmp_path: Path, settings: str, env: dict | None = None, resume: bool = False):
    from metaflow import Runner

    config = {} if resume else {"config": [("config", str(_config(tmp_path)))]}  # resume keeps the run's own
    runner = Runner(
        str(REPO / "flows" / "pipeline.py"), show_output=False, env=env or _env(tmp_path), cwd=str(REPO), **config
    )
    ctx = runner.resume() if resume else runner.run(loss="dpo", set=settings)
    with ctx as running:
        return running.status, running.run, running.stdout + running.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokenizer):
    """SFT in one process with grad_accum 2 on the same prepared data: the global batch the gangs must match."""
    from steps.config import config_from_dict, for_loss
    from steps.data import prepare_data
    from steps.train.launch import launch

    tmp = tmp_path_factory.mktemp("one_process")
    raw = yaml.safe_load(_config(tmp).read_text())
    raw["sft"]["grad_accum"] = raw["preference"]["grad_accum"] = 2
    prepare_data(config_from_dict(raw).data, tmp / "data")
    os.environ["OMP_NUM_THREADS"] = "1"
    sft = launch(config_from_dict(raw), "sft", str(tmp / "data"), str(tmp / "sft"))

    def dpo(sft_model_dir: str) -> TrainResult:
        """DPO in one process from the gang's own SFT model (the same start)."""
        out = tmp / f"dpo-{abs(hash(sft_model_dir))}"
        return launch(
            for_loss(config_from_dict(raw), "dpo"), "dpo", str(tmp / "data"), str(out), sft_model_dir=sft_model_dir
        )

    return {"sft": sft, "dpo": dpo}


def _assert_same_training(gang: TrainResult, one: TrainResult, gang_model_dir: Path | None = None) -> None:
    assert gang.steps == one.steps and len(gang.history) == gang.steps
    for a, b in zip(gang.history, one.history):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    x = load_file(Path(gang_model_dir or gang.model_dir) / "model.safetensors")
    y = load_file(Path(one.model_dir) / "model.safetensors")
    assert set(x) == set(y)
    # Adam at lr 1e-3 turns gloo's reduction-order noise in a near-zero gradient entry into up to ~lr/100 of
    # weight: measured once 1 entry of 3,268,928 at 1.35e-5 after an HSDP resume, the rest within 4.1e-6
    over = sum(int(((x[k] - y[k]).abs() > 1e-5).sum()) for k in x)
    assert over <= sum(v.numel() for v in x.values()) // 100_000, over
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=5e-5, rtol=0, msg=key)


def _gang_tasks(run, step: str) -> list[str]:
    return sorted(t.id for t in run[step])


def test_ddp_gangs_of_two_nodes_train_like_one_process(tmp_path, one_process):
    status, run, log = _run(tmp_path, GANG)
    assert status == "successful", log[-6000:]
    from metaflow import namespace

    namespace(None)
    assert {"sft_gang", "sft_nodes", "sft_gang_join", "preference_gang"} <= {s.id for s in run.steps()}
    sft_tasks = _gang_tasks(run, "sft_nodes")
    assert len(sft_tasks) == 2 and sft_tasks[1] == f"{sft_tasks[0]}_node_1"  # control task + 1 worker
    assert len(_gang_tasks(run, "preference_nodes")) == 2  # dpo's gang (the sft variant has nothing to train)
    sft = run["sft"].task.data.sft_summary
    assert sft.layout == {"parallelism": "ddp", "world_size": 2, "nodes": 2}
    _assert_same_training(sft, one_process["sft"])
    dpo = run["preference_gang_join"].task.data.train_summary
    assert dpo.kind == "dpo" and dpo.reference == sft.model_dir
    _assert_same_training(dpo, one_process["dpo"](sft.model_dir))
    rows = {r.variant: r for r in run["join"].task.data.results}
    assert set(rows) == {"sft", "dpo"} and rows["dpo"].evaluation.model_dir == dpo.model_dir


def test_hsdp_gang_through_the_datastore_survives_a_killed_rank(tmp_path, one_process):
    """fsdp on 2 nodes x 1 rank = HSDP (replicate 2, shard 1); models, checkpoints and every file a step reads
    come from the local datastore, since each step (and gang node) starts from an empty local output root. Rank 1
    dies after its first checkpoint in each attempt: the gang fails naming node 1, @retry resumes every node from
    step 1, dies again after step 2; ``resume`` (new run, same output root) finishes from step 2."""
    settings = f"{GANG} sft.parallelism=fsdp preference.parallelism=fsdp resources.model_store=datastore"
    settings += " evaluation.enabled=true evaluation.max_instructions=2 evaluation.max_new_tokens=4"
    settings += " evaluation.judge_model=tiny evaluation.batch_size=2 evaluation.heldout_max_pairs=2"
    settings += " evaluation.ifbench.limit=3"
    killing = _env(tmp_path, **hooks_env(REPO, **{WIPE_ENV: "1", KILL_RANK_ENV: "1"}))
    status, failed, log = _run(tmp_path, settings, killing)
    assert status == "failed"
    # node 1 is named; node 0 may be too (its rank lost its peer and torchrun exited as well), in either order
    gang_errors = re.findall(r"GangFailedError: gang failed: (.*)", log)
    assert any("node 1 of 2 failed: torchrun exited with code" in e for e in gang_errors), gang_errors or log[-6000:]
    assert "rank 1 kills itself (SIGKILL) after writing" in log
    from metaflow import namespace

    namespace(None)
    assert [t.current_attempt for t in failed["sft_nodes"]] == [1, 1]  # both nodes retried together
    from metaflow import Task

    control = min(failed["sft_nodes"], key=lambda t: len(t.id))  # a local gang's nodes all log to the control task
    for attempt, start in ((0, "the start"), (1, "step 1")):
        task = Task(control.pathspec, attempt=attempt)
        logged = task.stdout + task.stderr
        for node in (0, 1):  # @retry resumed every node from the checkpoint both had uploaded
            assert f"checkpoint sync (node {node}): resuming from {start}," in logged, (attempt, node)

    wiping = _env(tmp_path, **hooks_env(REPO, **{WIPE_ENV: "1"}))
    status, run, log = _run(tmp_path, settings, wiping, resume=True)
    assert status == "successful", log[-6000:]
    assert run.id != failed.id and len(_gang_tasks(run, "sft_nodes")) == 2
    sft = run["sft"].task.data.sft_summary
    assert sft.resumed_from.endswith("step_0000002")  # so the retry resumed from step 1 and wrote step 2
    assert sft.layout == {"parallelism": "fsdp", "world_size": 2, "nodes": 2, "mesh": [2, 1],
                          "mesh_dims": ["replicate", "shard"]}  # fmt: skip
    runs_root = Path(sft.model_dir).parents[1]
    assert not (runs_root / "sft").exists()  # wiped by the later steps: only the datastore has it
    from steps.model_store import ModelStore

    store = ModelStore.from_dict(run["start"].task.data.handoff)
    here = tmp_path / "from_datastore"
    store.pull(here / "sft", store.key_for(sft.model_dir))  # downloaded and verified against its manifest
    _assert_same_training(sft, one_process["sft"], here / "sft")
    dpo = run["preference_gang_join"].task.data.train_summary
    store.pull(here / "dpo", store.key_for(dpo.model_dir))
    _assert_same_training(dpo, one_process["dpo"](str(here / "sft")), here / "dpo")
    rows = {r.variant: r.evaluation.alpaca_eval for r in run["join"].task.data.results}
    assert all(r is not None and r.scores.n_total == 2 for r in rows.values())  # models and eval files came back
    paired = run["join"].task.data.results[1].paired_vs  # dpo (sft first): the join read both annotations
    assert paired is not None and paired.comparison is not None and paired.comparison["paired_n"] == 2
    shutil.rmtree(here)


def _session_task(session: int, step: str, task_suffix: str) -> int | None:
    """A process of ``session`` (the flow command's) running Metaflow task ``*<task_suffix>`` of ``step``."""
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2 :].split()[3]) != session or step.encode() not in argv:
            continue
        if b"--task-id" in argv and argv[argv.index(b"--task-id") + 1].decode().endswith(task_suffix):
            return int(name)
    return None


def test_the_readme_gang_command_runs_without_an_activated_venv_and_a_missing_node_fails_fast(tmp_path, tokenizer):
    """README's local gang command, with the venv's python by absolute path and a PATH that holds no project python
    (Metaflow starts the gang's other nodes as `python` from PATH). Node 1's first task is stopped (SIGSTOP) as soon as
    it starts, so it never joins: node 0 fails the gang within 2 minutes with one line naming node 1; @retry's second
    attempt, untouched, trains and the run finishes."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | flow_env(tmp_path) | {"PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "flows/pipeline.py", "--config", "config", str(_config(tmp_path)), "run", "--set", GANG]
    started = time.monotonic()
    flow = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in flow.stdout:  # type: ignore[union-attr]
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped: tuple[int, float] | None = None
    failed_at = None
    try:
        while flow.poll() is None and time.monotonic() - started < 900:
            if stopped is None and (pid := _session_task(flow.pid, "sft_nodes", "_node_1")):
                os.kill(pid, signal.SIGSTOP)
                stopped = (pid, time.monotonic())
            if stopped and failed_at is None:
                failed_at = next((t for t, line in lines if "never joined" in line), None)
                if failed_at is None and time.monotonic() - stopped[1] > 240:
                    break  # no failure 4 minutes on: the assertions below say what is missing
            time.sleep(0.05)
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGKILL)
        flow.wait()
        reader.join(timeout=30)
        if stopped and Path(f"/proc/{stopped[0]}").exists():  # node 0 ends it; should it not, the test does
            os.kill(stopped[0], signal.SIGKILL)
    log = "".join(line for _, line in lines)
    assert stopped is not None, log[-6000:]  # the worker task started: `python` on PATH ran this interpreter
    assert failed_at is not None, log[-6000:]
    (clear,) = {line.split("GangFailedError: ", 1)[1].strip() for _, line in lines if "GangFailedError: gang:" in line}
    assert re.fullmatch(
        r"gang: node 1 of 2 never joined \(waited \d+ s of 90\): its task PrefFlow/\d+/sft_nodes/\d+_node_1 was still "
        r"starting; node 0 ended it \(a busy machine\? raise resources.gang_join_timeout_s\)",
        clear,
    ), clear
    print(f"\n{clear}")
    print(
        f"node 1 stopped {stopped[1] - started:.1f} s after the command started; node 0 failed the gang "
        f"{failed_at - stopped[1]:.1f} s after that ({failed_at - started:.1f} s after the start); the run took "
        f"{time.monotonic() - started:.0f} s"
    )
    assert failed_at - stopped[1] < 120
    print("".join(line for _, line in lines if "gang: all 2 nodes joined" in line))  # how long nodes take to join
    assert flow.returncode == 0, log[-6000:]
    joined = [t for t, line in lines if re.search(r"gang: node [01] of 2, store at", line)]
    assert len(joined) >= 4  # both nodes reached the store on both attempts
