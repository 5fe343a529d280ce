"""Real Metaflow runs of the tiny model under faults: SIGKILLed sft/preference/evaluate steps resumed (``resume``) or
retried (``@retry``) give bit-identical weights and resend no judged pair; two runs at once share one datastore; a
full output location fails in ``start``; a planted API key and Hub token appear in no output."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.served_judge_server import ChatCompletionsServer

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "PREFFLOW_TEST_JUDGE_KEY"
JUDGE_KEY = "sk-planted-4c1d0a77e9b2f3e8a615"  # unique strings: a hit anywhere is a leak, never a coincidence
HF_KEY = "hf_planted5b8e2c9d1a7f4e63b09d"
STEPS, EVERY, KILL_AT = 24, 4, 4  # training steps, checkpoint_every_steps, the checkpoint after which we kill
N_EVAL = 4

CONFIG = """
name: reliability
data: {{input: embedded, max_trees: 36, dev_fraction: 0.2}}
model: {{base: tiny, dtype: float32}}
sft: {{lr: 1.0e-3, max_num_tokens: 128, max_seq_len: 128, overlength: truncate, max_steps: {steps},
      warmup_steps: 0, checkpoint_every_steps: {every}}}
preference:
  criterion: dpo
  criterion_config: {{beta: 0.1}}
  lr: 1.0e-3
  max_num_tokens: 256
  max_seq_len: 128
  overlength: truncate
  max_steps: {steps}
  checkpoint_every_steps: {every}
evaluation:
  eval_set: {eval_set}
  max_instructions: {n_eval}
  max_new_tokens: 4
  batch_size: 4
  ifbench: {{limit: 3}}
{judge}
resources: {{output_dir: {out}}}
"""
TINY_JUDGE = "  judge: local_logprob\n  judge_model: tiny"


def served_judge(url: str) -> str:
    return (
        f"  judge: openai_compatible\n  judge_model: served-tiny\n  judge_base_url: {url}\n"
        f"  judge_api_key_env: {KEY_ENV}\n  judge_concurrency: 1"
    )


class JudgeServer(ChatCompletionsServer):
    """The test server answering with "m" and "M" on top (the tiny model's own top 5 rarely holds either, and a
    judge whose every preference is NaN fails the paired comparison in ``join``: a separate bug, see the report)."""

    def complete(self, body: dict) -> dict:
        reply = super().complete(body)
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in (("m", -0.4), ("M", -1.1))]
        reply["choices"][0]["logprobs"]["content"] = [{**top[0], "top_logprobs": top}]
        reply["choices"][0]["message"]["content"] = "m"
        return reply


def write_config(where: Path, judge: str) -> Path:
    """The run config, with an eval set whose reference outputs are fixed texts: every pair goes to the judge
    (against the base model's own 4-token outputs most pairs would be identical, scored 1.5 without a call)."""
    where.mkdir(parents=True, exist_ok=True)
    eval_set = where / "eval_set.json"
    records = [
        {
            "instruction": f"Question {i}: name one thing that is {c}.",
            "output": f"Reference answer {i}: a {c} thing.",
            "generator": "fixed",
            "dataset": "reliability",
        }
        for i, c in enumerate(["red", "blue", "green", "soft"][:N_EVAL])
    ]
    eval_set.write_text(json.dumps(records))
    path = where / "config.yaml"
    text = CONFIG.format(steps=STEPS, every=EVERY, n_eval=N_EVAL, judge=judge, out=where / "runs", eval_set=eval_set)
    path.write_text(text)
    return path


def flow_env(datastore: Path, reports: Path) -> dict[str, str]:
    return {
        **os.environ,
        "USERNAME": "prefflow-test",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(datastore),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PREFFLOW_REPORT_DIR": str(reports),
        "PREFFLOW_MIN_FREE_MB": "1",
        "METAFLOW_CARD_LOCALROOT": str(datastore / "mf.cards"),  # else cards land in the working directory
        KEY_ENV: JUDGE_KEY,
        "HF_TOKEN": HF_KEY,
    }


class Flow:
    """One ``python flows/pipeline.py`` command in its own session (so a kill takes its whole process tree)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.run_id_file = log.with_suffix(".runid")
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "flows" / "pipeline.py"), *args, "--run-id-file", str(self.run_id_file)],
            cwd=REPO,
            env=env,
            stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def run_id(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not (self.run_id_file.exists() and self.run_id_file.read_text().strip()):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.05)
        return self.run_id_file.read_text().strip()

    def wait(self, timeout: float = 400) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_all(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def workers(self, step: str, attempt: int = 0) -> list[psutil.Process]:
        """The task processes of ``step`` (Metaflow's ``step <name> ... --retry-count <attempt>`` children)."""
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            is_step = "step" in cmd and cmd[cmd.index("step") + 1] == step and "--retry-count" in cmd
            if is_step and cmd[cmd.index("--retry-count") + 1] == str(attempt):
                found.append(child)
        return found


def when(
    condition: Callable[[], bool], action: Callable[[], None], flow: Flow, timeout: float = 300
) -> threading.Thread:
    """Poll ``condition`` every 2 ms in a thread and run ``action`` once when it holds (the kill); give up when
    ``flow`` ends first (the test then fails on the exit code)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and flow.proc.poll() is None:
            if condition():
                action()
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def checkpoints(root: Path, name: str) -> list[str]:
    found = root / name / "checkpoints"
    return sorted(p.name for p in found.glob("step_*")) if found.is_dir() else []


def checkpoint_exists(root_of: Callable[[], Path | None], name: str) -> Callable[[], bool]:
    def check() -> bool:
        root = root_of()
        return root is not None and (root / name / "checkpoints" / f"step_{KILL_AT:07d}").is_dir()

    return check


def final_weights(root: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(root / name / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def run_of(datastore: Path, run_id: str):
    from metaflow import Run, metadata, namespace

    os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(datastore)
    metadata(f"local@{datastore}")
    namespace(None)
    return Run(f"PrefFlow/{run_id}")


@pytest.fixture(scope="module")
def judge_model():
    from steps.models import load_model, load_tokenizer

    return load_model("tiny", seed=5), load_tokenizer("tiny")


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory, judge_model):
    """Two flows at once, one datastore, one working directory, one output dir and report dir: A (served judge,
    never interrupted) and B (tiny local judge; the first attempt of its sft and of its dpo preference task are
    SIGKILLed after the step-4 checkpoint, so @retry's second attempt resumes from it)."""
    tmp = tmp_path_factory.mktemp("concurrent")
    server = JudgeServer(*judge_model, api_key=JUDGE_KEY).start()
    env = flow_env(tmp / "mf", tmp / "reports")
    t0 = time.monotonic()
    try:
        a = Flow(
            ["--config", "config", str(write_config(tmp / "a", served_judge(server.url))), "run", "--loss", "dpo"],
            env,
            tmp / "a.log",
        )
        b_config = (
            write_config(tmp / "b", TINY_JUDGE).read_text().replace(str(tmp / "b" / "runs"), str(tmp / "a" / "runs"))
        )
        (tmp / "b" / "config.yaml").write_text(b_config)  # B writes under the same output dir as A
        b = Flow(["--config", "config", str(tmp / "b" / "config.yaml"), "run", "--loss", "dpo"], env, tmp / "b.log")
        b_root = tmp / "a" / "runs" / "PrefFlow" / b.run_id()
        killed: dict[str, int] = {}

        def kill_first_attempt(step: str) -> Callable[[], None]:
            def kill() -> None:
                for worker in b.workers(step):
                    killed[step] = worker.pid
                    worker.send_signal(signal.SIGKILL)

            return kill

        sft_kill = when(checkpoint_exists(lambda: b_root, "sft"), kill_first_attempt("sft"), b)
        sft_kill.join(timeout=300)
        killed["sft_checkpoints"] = checkpoints(b_root, "sft")
        pref_kill = when(checkpoint_exists(lambda: b_root, "dpo"), kill_first_attempt("preference"), b)
        pref_kill.join(timeout=300)
        killed["dpo_checkpoints"] = checkpoints(b_root, "dpo")
        codes = (a.wait(), b.wait())
    finally:
        server.stop()
    elapsed = time.monotonic() - t0
    print(f"two concurrent runs: {elapsed:.0f}s")
    return {"tmp": tmp, "a": a, "b": b, "codes": codes, "server": server, "killed": killed, "elapsed": elapsed}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, judge_model):
    """One run SIGKILLed whole (scheduler and tasks, as a lost node) three times: in sft after the step-4 checkpoint,
    in the dpo preference task likewise, and in evaluate after two judgements; each time ``resume``d."""
    tmp = tmp_path_factory.mktemp("resumed")
    server = JudgeServer(*judge_model, api_key=JUDGE_KEY, delay_s=0.4).start()
    env = flow_env(tmp / "mf", tmp / "reports")
    config = write_config(tmp / "c", served_judge(server.url))
    cache_dir = tmp / "c" / "runs" / "PrefFlow" / "judge_cache"
    t0 = time.monotonic()
    stages = []
    try:
        flow = Flow(["--config", "config", str(config), "run", "--loss", "dpo"], env, tmp / "run0.log")
        origin = flow.run_id()
        root = tmp / "c" / "runs" / "PrefFlow" / origin

        def judged() -> int:
            files = list(cache_dir.glob("*.jsonl"))
            return files[0].read_bytes().count(b"\n") if files else 0

        at_start: dict[str, object] = {}

        def evaluating() -> bool:
            """One more pair was judged in this stage, and not all: the sft and dpo models give the same 4-token
            answers here, so the N_EVAL pairs are all there are."""
            return at_start["judged"] < judged() < N_EVAL  # type: ignore[operator]

        def training_dpo() -> bool:
            """The dpo step-4 checkpoint appeared in this stage (it stays after a kill, so "exists" is not enough)."""
            return f"step_{KILL_AT:07d}" not in at_start["dpo"] and checkpoint_exists(lambda: root, "dpo")()  # type: ignore[operator]

        # sft runs alone; after it, the sft variant's evaluate and the dpo training race for the CPU lock, so the
        # preference and evaluate kills come in whichever order the run reaches them
        remaining = {"sft": checkpoint_exists(lambda: root, "sft")}
        later = {"preference": training_dpo, "evaluate": evaluating}
        for i in range(3):
            at_start.update(judged=judged(), dpo=checkpoints(root, "dpo"))
            hit: list[str] = []

            def any_condition(hit: list[str] = hit) -> bool:
                hit.extend(name for name, holds in remaining.items() if holds())
                return bool(hit)

            when(any_condition, flow.kill_all, flow).join(timeout=300)
            step = hit[0] if hit else "?"
            assert flow.proc.returncode == -signal.SIGKILL, (
                f"{remaining}: the run ended before the kill\n{flow.output()}"
            )
            remaining.pop(step)
            if step == "sft":
                remaining.update(later)
            snapshot = {
                "step": step,
                "run_id": flow.run_id(),
                "sft": checkpoints(root, "sft"),
                "dpo": checkpoints(root, "dpo"),
                "judged": judged(),
                "judged_before": at_start["judged"],
                "requests": server.user_texts(),
                "mtimes": {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()},
            }
            stages.append(snapshot)
            flow = Flow(
                ["resume", "--origin-run-id", str(snapshot["run_id"])], env, tmp / f"resume{i + 1}.log"
            )  # resume reuses the origin's config
        code = flow.wait()
        final_id = flow.run_id()
    finally:
        server.stop()
    elapsed = time.monotonic() - t0
    print(f"killed and resumed run: {elapsed:.0f}s")
    return {
        "tmp": tmp,
        "root": root,
        "origin": origin,
        "final": final_id,
        "code": code,
        "flow": flow,
        "stages": stages,
        "server": server,
        "elapsed": elapsed,
    }


@pytest.mark.slow
def test_two_runs_at_once_finish_independently(concurrent_runs):
    r = concurrent_runs
    assert r["codes"] == (0, 0), r["a"].output()[-3000:] + r["b"].output()[-3000:]
    tmp = r["tmp"]
    ids = [r["a"].run_id(), r["b"].run_id()]
    assert ids[0] != ids[1]
    for run_id, judge in zip(ids, ("openai_compatible:served-tiny", "local_logprob")):
        run = run_of(tmp / "mf", run_id)
        assert run.successful
        results = {x.variant: x.evaluation for x in run["join"].task.data.results}
        assert set(results) == {"sft", "dpo"}
        for x in results.values():
            assert x.alpaca_eval is not None and x.alpaca_eval.judge.label.startswith(judge)
            assert x.alpaca_eval.scores.n_total == N_EVAL
            assert Path(x.model_dir).is_relative_to(tmp / "a" / "runs" / "PrefFlow" / run_id)
    rows = json.loads((tmp / "reports" / "results.json").read_text())["rows"]  # one whole report, both runs in it
    assert {row["run_id"] for row in rows} == set(ids)
    # same seed, same data: identical weights whether a run was alone, concurrent, or killed and retried
    a_root, b_root = (tmp / "a" / "runs" / "PrefFlow" / i for i in ids)
    for name in ("sft", "dpo"):
        assert_same_weights(final_weights(a_root, name), final_weights(b_root, name))


@pytest.mark.slow
def test_retry_resumes_a_killed_attempt_from_its_checkpoint(concurrent_runs):
    r = concurrent_runs
    assert r["codes"][1] == 0, r["b"].output()[-3000:]
    killed = r["killed"]
    assert "sft" in killed and "preference" in killed, killed
    final = f"step_{STEPS:07d}"
    for name in ("sft", "dpo"):  # killed mid-training: a mid-epoch checkpoint, not the last one
        assert f"step_{KILL_AT:07d}" in killed[f"{name}_checkpoints"] and final not in killed[f"{name}_checkpoints"]
    run = run_of(r["tmp"] / "mf", r["b"].run_id())
    b_root = r["tmp"] / "a" / "runs" / "PrefFlow" / run.id
    sft = run["sft"].task
    assert sft.current_attempt == 1  # the second attempt is the one that finished
    assert sft.data.sft_summary.resumed_from.endswith(f"step_{KILL_AT:07d}")
    assert sft.data.sft_summary.steps == STEPS
    pref = next(t for t in run["preference"].tasks() if t.data.variant["name"] == "dpo")
    assert pref.current_attempt == 1
    assert pref.data.train_summary.resumed_from == str(b_root / "dpo" / "checkpoints" / f"step_{KILL_AT:07d}")
    history = [
        json.loads(line)["step"]
        for line in (b_root / "dpo" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("split") != "dev"
    ]
    assert history == list(range(1, STEPS + 1))  # every step logged once, none twice after the resume


@pytest.mark.slow
def test_resume_after_kills_in_sft_preference_and_evaluate(resumed_run, concurrent_runs):
    r = resumed_run
    assert r["code"] == 0, r["flow"].output()[-4000:]
    root, stages = r["root"], r["stages"]
    assert stages[0]["step"] == "sft" and sorted(s["step"] for s in stages) == ["evaluate", "preference", "sft"]
    assert stages[0]["run_id"] == r["origin"] and len({s["run_id"] for s in stages} | {r["final"]}) == 4
    by_step = {s["step"]: s for s in stages}
    next_run = {s["run_id"]: n for s, n in zip(stages, [s["run_id"] for s in stages[1:]] + [r["final"]])}
    final, mid = f"step_{STEPS:07d}", f"step_{KILL_AT:07d}"
    assert mid in by_step["sft"]["sft"] and final not in by_step["sft"]["sft"]  # sft killed mid-epoch
    assert mid in by_step["preference"]["dpo"] and final not in by_step["preference"]["dpo"]  # preference too
    # every resumed run wrote into the origin run's output root: the checkpoints were found there
    run = run_of(r["tmp"] / "mf", r["final"])
    assert run["start"].task.data.output_root == str(root)
    after_sft = run_of(r["tmp"] / "mf", next_run[by_step["sft"]["run_id"]])
    assert after_sft["sft"].task.data.sft_summary.resumed_from == str(root / "sft" / "checkpoints" / mid)
    # the dpo task finishes in the first later run not killed while it trained (an evaluate kill can land while
    # the dpo step still trains), resumed from the newest checkpoint there was when the run before it was killed
    pref, before = None, None
    for stage in stages[stages.index(by_step["preference"]) :]:
        tasks = run_of(r["tmp"] / "mf", next_run[stage["run_id"]])["preference"].tasks()
        pref = next((t for t in tasks if t.successful and t.data.variant["name"] == "dpo"), None)
        if pref is not None:
            before = stage
            break
    assert pref is not None and before is not None, [(s["step"], s["dpo"]) for s in stages]
    assert pref.data.train_summary.resumed_from == str(root / "dpo" / "checkpoints" / before["dpo"][-1])
    # finished steps were cloned, not redone: Metaflow says so, and the files they wrote were not touched again
    produced = {"sft": root / "sft" / "final", "preference": root / "dpo" / "final"}
    for stage in stages:
        killed, resumed = (run_of(r["tmp"] / "mf", i) for i in (stage["run_id"], next_run[stage["run_id"]]))
        finished = [s.id for s in killed if all(t.successful for t in s.tasks()) and s.id not in ("join", "end")]
        assert {"start", "prepare_data", "reference_outputs"} <= set(finished), finished
        for step in finished:
            assert all(t.origin_pathspec for t in resumed[step].tasks()), (resumed.id, step)
        later = {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
        done_dirs = [root / "data", root / "eval" / "reference_outputs.json"]
        done_dirs += [d for name, d in produced.items() if name in finished]
        touched = [
            p
            for p, t in stage["mtimes"].items()
            if any(Path(p).is_relative_to(d) for d in done_dirs)
            and later.get(p) != t
            and Path(p).name != "README.md"  # the model card: each evaluate step adds its results to it
        ]
        assert not touched, (stage["step"], touched[:5])
    # bit-identical to the uninterrupted run A (same seed)
    a_root = concurrent_runs["tmp"] / "a" / "runs" / "PrefFlow" / concurrent_runs["a"].run_id()
    for name in ("sft", "dpo"):
        assert_same_weights(final_weights(root, name), final_weights(a_root, name))


@pytest.mark.slow
def test_killed_judging_resends_no_judged_pair(resumed_run):
    r = resumed_run
    assert r["code"] == 0, r["flow"].output()[-4000:]
    at_kill = next(s for s in r["stages"] if s["step"] == "evaluate")
    judged = at_kill["judged"]
    requests = r["server"].user_texts()
    n_pairs = 2 * N_EVAL  # the sft and dpo models, each on N_EVAL instructions
    cached = next((r["root"].parent / "judge_cache").glob("*.jsonl")).read_text().splitlines()
    assert at_kill["judged_before"] < judged < len(cached)  # killed mid-judging
    # concurrency 1: requests are answered and cached in order, so the first `judged` ones are the judged pairs
    for text in at_kill["requests"][:judged]:
        assert requests.count(text) == 1
    in_flight = len(at_kill["requests"]) - judged
    assert in_flight <= 1 and len(requests) <= n_pairs + in_flight
    assert len(set(requests)) == len(cached) <= n_pairs  # every pair judged once (sft and dpo may share some)
    results = run_of(r["tmp"] / "mf", r["final"])["join"].task.data.results
    assert all(x.evaluation.alpaca_eval and x.evaluation.alpaca_eval.scores.n_total == N_EVAL for x in results)


def _blobs(where: Path) -> list[tuple[str, bytes]]:
    """Every file under ``where`` as bytes, gzip members (Metaflow artifacts, the code package) decompressed."""
    found = []
    for path in where.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if data[:2] == b"\x1f\x8b":
                with contextlib.suppress(OSError, EOFError):
                    data = gzip.decompress(data)
            found.append((str(path), data))
    return found


@pytest.mark.slow
def test_planted_keys_appear_in_no_output(concurrent_runs, resumed_run):
    """Every file of both fixtures (datastore artifacts, metadata, task logs, cards, runs/ with models, metrics,
    tracking and config snapshots, reports, judge caches) and every captured flow log: no planted key."""
    for r in (concurrent_runs, resumed_run):
        served = r["server"].requests
        assert served and all(q["authorization"] == f"Bearer {JUDGE_KEY}" for q in served)  # the key was used
    blobs = _blobs(concurrent_runs["tmp"]) + _blobs(resumed_run["tmp"])
    artifacts = [p for p, _ in blobs if "/mf/" in p]
    assert len(artifacts) > 100 and any("/cards/" in p and p.endswith(".html") for p in artifacts)
    assert any(p.endswith("results.json") for p, _ in blobs)
    hits = [p for p, data in blobs for key in (JUDGE_KEY, HF_KEY) if key.encode() in data]
    assert hits == []


@pytest.mark.slow
def test_full_output_location_fails_in_start_and_keeps_earlier_outputs(tmp_path):
    """A location without room (``$PREFFLOW_MIN_FREE_MB`` above what the disk has) fails in ``start`` with the
    error naming the key, before prepare_data runs; an earlier run's files and the report are untouched."""
    config = write_config(tmp_path, TINY_JUDGE)
    earlier = tmp_path / "runs" / "PrefFlow" / "1"
    (earlier / "sft" / "final").mkdir(parents=True)
    (earlier / "sft" / "final" / "model.safetensors").write_bytes(b"earlier weights")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "results.json").write_text('{"rows": [{"run_id": "1"}]}')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    env = {**flow_env(tmp_path / "mf", tmp_path / "reports"), "PREFFLOW_MIN_FREE_MB": str(10**12)}
    flow = Flow(["--config", "config", str(config), "run", "--loss", "dpo"], env, tmp_path / "flow.log")
    assert flow.wait(timeout=300) != 0
    out = flow.output()
    assert "resources.output_dir" in out and "free" in out, out[-3000:]
    run = run_of(tmp_path / "mf", flow.run_id())
    assert [s.id for s in run] == ["start"] and not run["start"].task.successful
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p in before}
    assert after == before
    assert sorted(p.name for p in (tmp_path / "runs" / "PrefFlow").iterdir()) == ["1"]  # nothing new in runs/
