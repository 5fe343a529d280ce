"""One training job over a Metaflow ``@parallel`` gang: each node's torchrun joins node 0's rendezvous, and a small
store on node 0 (the next port) orders the nodes' start (every node joins it, within a bounded wait; node 0 picks the
checkpoint every node resumes from) and stops every node as soon as one fails, with that node's error, instead of
leaving the others hanging. Metaflow's local runtime starts a gang's other nodes as ``python flow.py step ...`` with
``python`` from PATH: the helpers at the end make that this interpreter, or say why it is not."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steps.results import TrainResult

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOCAL_PORTS = (20000, 45000)  # where local gangs (every node on this machine) pick their rendezvous port
PLAN_WAIT_S = 7 * 24 * 3600.0
#: How long node 0 waits for the other nodes to join its store (``resources.gang_join_timeout_s`` when null): a
#: local gang's nodes start together on this machine; pods of a gang across machines may still pull their image.
JOIN_ON_ONE_MACHINE_S = 90
JOIN_ACROSS_MACHINES_S = 600
#: What Metaflow's local runtime starts a gang's worker tasks with, looked up on PATH.
WORKER_PYTHON = "python"


class GangFailedError(RuntimeError):
    """A node of the gang failed (its own torchrun, or another node's); the message names the node and why."""


@dataclass(frozen=True)
class Gang:
    """This node's place in a gang (from ``current.parallel``) and the rendezvous port on the main node."""

    num_nodes: int
    node_index: int
    main_ip: str
    port: int  # torchrun's rendezvous; port + 1 is the gang's coordination store
    # a local gang under Metaflow: node 0's task (flow/run/step/id); node k's task is "<it>_node_<k>", a child
    # process of node 0's (None: nodes started elsewhere, e.g. pods)
    control_task: str | None = None

    @property
    def is_main(self) -> bool:
        return self.node_index == 0

    @property
    def on_one_machine(self) -> bool:
        """Every node runs here (Metaflow's local runtime starts a gang's tasks as processes of this machine)."""
        return self.main_ip in LOOPBACK

    def as_dict(self) -> dict:
        return asdict(self)


def current_gang(master_port: int) -> Gang:
    """This task's node of the running @parallel step (``current.parallel``) and its rendezvous port: Kubernetes'
    MF_MASTER_PORT (``resources.master_port`` through @kubernetes), a port derived from the task for a gang on this
    machine, else ``master_port``."""
    from metaflow import current

    par = current.parallel  # type: ignore[attr-defined]  # @parallel adds it to current at run time
    local = par.main_ip in LOOPBACK and "MF_MASTER_PORT" not in os.environ
    if "MF_MASTER_PORT" in os.environ:
        port = int(os.environ["MF_MASTER_PORT"])
    elif local:
        port = local_port(current.run_id, current.step_name, par.control_task_id, current.retry_count)
    else:
        port = master_port
    control = f"{current.flow_name}/{current.run_id}/{current.step_name}/{par.control_task_id}"
    return Gang(par.num_nodes, par.node_index, par.main_ip, port, control if local and par.control_task_id else None)


def gang_summary(summaries: list[TrainResult | None], enabled: bool, what: str) -> TrainResult | None:
    """The gang's training result: the one node 0 returned (global rank 0 trained there and wrote the model)."""
    found = [s for s in summaries if s is not None]
    if enabled and len(found) != 1:
        raise GangFailedError(f"{what}: expected one summary, from node 0, got {len(found)} of {len(summaries)}")
    return found[0] if found else None


def local_port(*parts: object) -> int:
    """A rendezvous port for a gang on this machine, the same in every node's process (they share the parts: run,
    step, control task, attempt) and different between gangs, so gangs of parallel branches do not collide."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    low, high = LOCAL_PORTS
    return low + int.from_bytes(digest[:4], "big") % (high - low - 1)


def torchrun_node_args(gang: Gang, nproc_per_node: int, timeout_s: int) -> list[str]:
    """torchrun's static rendezvous: node ranks are Metaflow's node indices, so global rank 0 (which writes the
    summary and the model) runs on node 0, the control task whose artifacts the gang's join keeps."""
    return [
        f"--nnodes={gang.num_nodes}",
        f"--node-rank={gang.node_index}",
        f"--nproc-per-node={nproc_per_node}",
        f"--master-addr={gang.main_ip}",
        f"--master-port={gang.port}",
        f"--rdzv-conf=timeout={timeout_s}",
        "--max-restarts=0",  # restarts are Metaflow's @retry: the whole gang, from the last checkpoint
    ]


def visible_devices_for(gang: Gang, nproc_per_node: int, device_count: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for this node when every node runs on this machine (else None: the node's own GPUs)."""
    if not gang.on_one_machine or device_count == 0:
        return None
    need = gang.num_nodes * nproc_per_node
    if device_count < need:
        raise GangFailedError(
            f"a local gang of {gang.num_nodes} nodes x {nproc_per_node} ranks needs {need} GPUs on this machine, "
            f"found {device_count}: lower resources.num_nodes or nproc_per_node, or run on Kubernetes"
        )
    first = gang.node_index * nproc_per_node
    return ",".join(str(i) for i in range(first, first + nproc_per_node))


class GangCoordinator:
    """A TCPStore served by node 0's step process: who joined, the start plan, checkpoint flags and each node's
    outcome. ``timeout_s`` bounds reaching the store and node 0's wait for outcomes; ``join_timeout_s`` how long
    node 0 waits for the other nodes to join before it publishes the plan."""

    def __init__(self, gang: Gang, timeout_s: float, join_timeout_s: float = JOIN_ON_ONE_MACHINE_S):
        import torch.distributed as dist

        self.gang = gang
        self.timeout_s = timeout_s
        self.join_timeout_s = join_timeout_s
        self.started = time.monotonic()
        where = f"{gang.main_ip}:{gang.port + 1}"
        try:
            self.store = dist.TCPStore(
                gang.main_ip,
                gang.port + 1,
                is_master=gang.is_main,
                timeout=datetime.timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
        except Exception as exc:
            raise GangFailedError(
                f"node {gang.node_index} of {gang.num_nodes}: could not "
                f"{'serve' if gang.is_main else 'reach'} the gang's store at {where}: {exc}"
            ) from exc
        logger.info("gang: node %d of %d, store at %s", gang.node_index, gang.num_nodes, where)
        if not gang.is_main:
            self._call("joining", lambda: self.store.set(f"joined/{gang.node_index}", str(os.getpid())))

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # DistStoreError / RuntimeError: node 0's process (the server) is gone
            raise GangFailedError(
                f"node {self.gang.node_index} of {self.gang.num_nodes}: lost the gang's store on node 0 while "
                f"{what} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); node 0 failed or was "
                "stopped, see its log"
            ) from exc

    def publish_plan(self, plan: dict) -> None:
        """Node 0: the start plan, once every node has joined (:meth:`wait_for_nodes`)."""
        self.wait_for_nodes()
        self._call("publishing the plan", lambda: self.store.set("plan", json.dumps(plan)))

    def wait_for_nodes(self, poll_s: float = 0.5) -> None:
        """Node 0: wait until every other node has joined, at most ``join_timeout_s`` after this store started;
        raise :class:`GangFailedError` naming each missing node and why, as soon as the why is known (a local
        node's task process has exited) or the time is up."""
        told = False
        while True:
            missing = self._call("checking who joined", self._not_joined)
            waited = time.monotonic() - self.started
            if not missing:
                logger.info(
                    "gang: all %d nodes joined, %.1f s after node 0's store started", self.gang.num_nodes, waited
                )
                return
            if not told:
                logger.info("gang: node 0 waits up to %g s for node(s) %s to join", self.join_timeout_s, missing)
                told = True
            gone = {i: why for i in missing if (why := self._exited(i))}
            if gone or waited >= self.join_timeout_s:
                why_not = {i: gone.get(i) or self._still_missing(i) for i in missing}
                self._end_local_tasks(missing)
                raise GangFailedError("gang: " + "; ".join(self._never_joined(i, why_not[i], waited) for i in why_not))
            time.sleep(poll_s)

    def _not_joined(self) -> list[int]:
        return [i for i in range(1, self.gang.num_nodes) if not self.store.check([f"joined/{i}"])]

    def _never_joined(self, node: int, why: str, waited: float) -> str:
        waited_text = f"waited {waited:.0f} s of {self.join_timeout_s:g}"
        return f"node {node} of {self.gang.num_nodes} never joined ({waited_text}): {why}"

    def _gone_task(self, node: int) -> str | None:
        """Node 0 of a local gang: node ``node``'s task when its process (a child of this one: Metaflow's local
        runtime starts it from node 0's task) has exited; None while it runs, or where this process cannot tell."""
        if not self.gang.is_main or self.gang.control_task is None:
            return None
        return (
            f"{self.gang.control_task}_node_{node}" if task_processes(f"{self._task_id()}_node_{node}") == [] else None
        )

    def _exited(self, node: int) -> str | None:
        """Why node ``node`` cannot join any more, where node 0 can see it (its local task has exited)."""
        task = self._gone_task(node)
        if task is None:
            return None
        problem = worker_python_problem(os.environ)
        return f"its task {task} exited before joining (its error is in this step's log above)" + (
            f"; {problem}" if problem else ""
        )

    def _end_local_tasks(self, nodes: list[int]) -> None:
        """Node 0 of a local gang giving up: end these nodes' task processes (its children), which would otherwise
        wait for a store that is gone, and hold the step's log (so the step's end and its @retry) open."""
        if self.gang.is_main and self.gang.control_task is not None:
            end_processes([p for i in nodes for p in task_processes(f"{self._task_id()}_node_{i}") or []])

    def _task_id(self) -> str:
        return str(self.gang.control_task).rsplit("/", 1)[-1]

    def _still_missing(self, node: int) -> str:
        """Why node ``node`` has not joined, as far as node 0 knows (its local task, if any, is ended next)."""
        if self.gang.control_task is not None:
            ended = "; node 0 ended it" if task_processes(f"{self._task_id()}_node_{node}") else ""
            return (
                f"its task {self.gang.control_task}_node_{node} was still starting{ended} (a busy machine? raise "
                "resources.gang_join_timeout_s)"
            )
        if self.gang.on_one_machine:
            return "it did not reach this machine's gang store (see its log; raise resources.gang_join_timeout_s)"
        return (
            f"its pod may be pending (no free GPUs), still pulling its image, or unable to reach "
            f"{self.gang.main_ip}:{self.gang.port + 1} (check the gang's pods; raise resources.gang_join_timeout_s)"
        )

    def wait_plan(self, timeout_s: float = PLAN_WAIT_S) -> dict:
        """Node k: wait for node 0, which may first wait its turn on this machine's heavy-step lock (long: a dead
        node 0 closes the store, and the wait fails at once)."""
        logger.info("gang: node %d waits for node 0's start plan", self.gang.node_index)
        wait = datetime.timedelta(seconds=timeout_s)
        self._call("waiting for node 0's start plan", lambda: self.store.wait(["plan"], wait))
        return json.loads(self._call("reading node 0's start plan", lambda: self.store.get("plan")))

    def set_value(self, name: str, value: str) -> None:
        self._call(f"setting {name}", lambda: self.store.set(f"value/{name}", value))

    def get_value(self, name: str) -> str | None:
        key = f"value/{name}"
        return self._call(f"reading {name}", lambda: self.store.get(key).decode() if self.store.check([key]) else None)

    def report(self, outcome: str) -> None:
        """``done`` or ``failed: <why>`` for this node."""
        self._call("reporting", lambda: self.store.set(f"node/{self.gang.node_index}", outcome))

    def outcomes(self) -> dict[int, str]:
        """What the other nodes reported so far."""
        keys = {i: f"node/{i}" for i in range(self.gang.num_nodes) if i != self.gang.node_index}
        return self._call("reading outcomes", lambda: self._read(keys))

    def _read(self, keys: dict[int, str]) -> dict[int, str]:
        return {i: self.store.get(k).decode() for i, k in keys.items() if self.store.check([k])}

    def failures(self) -> dict[int, str]:
        """The nodes that reported a failure; on node 0 of a local gang also those whose task exited without
        reporting (killed, or died before it could)."""
        seen = self.outcomes()
        failed = {i: o for i, o in seen.items() if o.startswith("failed")}
        for i in range(1, self.gang.num_nodes):
            if i not in seen and (task := self._gone_task(i)):
                late = self.outcomes().get(i)  # a node reports before its task exits: read again after the exit
                if late is None:
                    failed[i] = f"failed: its task {task} exited without reporting (its error is in this step's log)"
                elif late.startswith("failed"):
                    failed[i] = late
        return failed

    def wait_for_others(self, timeout_s: float) -> dict[int, str]:
        """Node 0 keeps the store up until every node reported or its local task is gone (or ``timeout_s``): a
        node still uploading its checkpoint shards needs it."""
        deadline = time.monotonic() + timeout_s
        others = [i for i in range(self.gang.num_nodes) if i != self.gang.node_index]
        seen: dict[int, str] = {}
        while time.monotonic() < deadline:
            try:
                seen = self.outcomes()
            except GangFailedError:
                break
            if all(i in seen or self._gone_task(i) for i in others):
                break
            time.sleep(0.5)
        return seen


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun's process group (the agent and its ranks), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _describe(failures: dict[int, str], num_nodes: int) -> str:
    return "; ".join(f"node {i} of {num_nodes} {why}" for i, why in sorted(failures.items()))


def run_node(
    cmd: Sequence[str],
    env: dict[str, str],
    gang: Gang | None,
    coordinator: GangCoordinator | None,
    on_poll: Callable[[], object] | None = None,
    on_exit: Callable[[], None] | None = None,
    poll_s: float = 1.0,
) -> None:
    """Run this node's torchrun; ``on_poll`` every ``poll_s`` (checkpoint uploads), ``on_exit`` once it ends.

    A gang node stops its torchrun as soon as another node reports a failure and raises
    :class:`GangFailedError` naming every node that failed so far; its own failure is reported to the others first."""
    where = f"node {gang.node_index} of {gang.num_nodes}" if gang else "this node"
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    try:
        while proc.poll() is None:
            if on_poll is not None:
                on_poll()
            failed = coordinator.failures() if coordinator is not None else {}
            if failed:
                logger.error("gang: %s; stopping %s", _describe(failed, gang.num_nodes if gang else 1), where)
                _stop(proc)
                if on_exit is not None:
                    on_exit()
                coordinator.report("failed: stopped because another node failed")  # type: ignore[union-attr]
                if gang is not None and gang.is_main:
                    coordinator.wait_for_others(30)  # type: ignore[union-attr]
                raise GangFailedError(f"gang failed: {_describe(failed, gang.num_nodes if gang else 1)}")
            time.sleep(poll_s)
    except BaseException:
        _stop(proc)
        raise
    if on_exit is not None:
        on_exit()
    code = proc.returncode
    if code == 0:
        if coordinator is not None:
            coordinator.report("done")
            if gang is not None and gang.is_main:
                coordinator.wait_for_others(coordinator.timeout_s)
        return
    mine = f"failed: torchrun exited with code {code} (the log above names the rank that failed)"
    if coordinator is None or gang is None:
        raise GangFailedError(f"{where} {mine}")
    coordinator.report(mine)
    others: dict[int, str] = {}
    deadline = time.monotonic() + 10  # the node that failed first is usually a moment ahead: name it too
    while time.monotonic() < deadline and not others:
        try:
            others = coordinator.failures()
        except GangFailedError:  # node 0 already left: this node's own failure is the news
            break
        time.sleep(0.5)
    if gang.is_main:
        coordinator.wait_for_others(30)
    raise GangFailedError(f"gang failed: {_describe({**others, gang.node_index: mine}, gang.num_nodes)}")


def task_processes(task_id: str) -> list[int] | None:
    """Live child processes of this one whose command line names Metaflow task ``task_id`` (a local gang's node
    k: ``python flow.py step ... --task-id <id>``); None where /proc cannot tell (not Linux)."""
    if not os.path.isdir("/proc"):
        return None
    me, wanted, found = os.getpid(), task_id.encode(), []
    for name in filter(str.isdigit, os.listdir("/proc")):
        state = _state_and_parent(int(name))
        if state is None or state[1] != me or state[0] == "Z":
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if wanted in argv:
            found.append(int(name))
    return found


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter (Z: exited, not yet reaped) and parent pid from /proc; None: no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]  # the name in parentheses may hold spaces
        return state.decode(), int(ppid)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    state = _state_and_parent(pid)
    return state is not None and state[0] != "Z"


def end_processes(pids: Sequence[int], grace_s: float = 10.0) -> None:
    """SIGTERM (with SIGCONT, for a stopped one) to each process, SIGKILL to those still alive after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in filter(_alive, pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _prefix_of(python: str) -> str | None:
    """``sys.prefix`` of the environment that ``python`` runs (None: it does not run)."""
    if python == sys.executable:
        return sys.prefix
    try:
        done = subprocess.run(
            [python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def runs_same_python(candidate: str | None, executable: str) -> bool:
    """Whether ``candidate`` runs the same Python environment as ``executable``: the same file in the same
    directory (a virtual environment's ``python`` beside its ``python3``), else the same ``sys.prefix`` when run
    (a venv's python and its base interpreter are one file, but not one environment)."""
    if not candidate or not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        return False
    try:
        if os.path.samefile(os.path.dirname(candidate), os.path.dirname(executable)) and os.path.samefile(
            candidate, executable
        ):
            return True
    except OSError:
        return False
    mine = _prefix_of(executable)
    return mine is not None and _prefix_of(candidate) == mine


def put_own_python_first(environ: MutableMapping[str, str], executable: str = sys.executable) -> bool:
    """Put ``executable``'s directory first on ``environ``'s PATH when its ``python`` is this same environment
    (e.g. ``.venv/bin`` for ``.venv/bin/python``), so that the tasks Metaflow starts from this process, a local
    gang's worker tasks included, run this interpreter. False (PATH unchanged) where that directory has none."""
    here = os.path.dirname(os.path.abspath(executable))
    if not runs_same_python(os.path.join(here, WORKER_PYTHON), executable):
        return False
    parts = environ.get("PATH", "").split(os.pathsep)
    if parts[0] != here:
        environ["PATH"] = os.pathsep.join([here, *(p for p in parts if p)])
    return True


def worker_python_problem(environ: Mapping[str, str], executable: str = sys.executable) -> str | None:
    """Why a local gang's worker tasks (``python`` from ``environ``'s PATH) would not run ``executable``'s
    environment, with what to do; None when they would."""
    found = shutil.which(WORKER_PYTHON, path=environ.get("PATH", ""))
    if runs_same_python(found, executable):
        return None
    if found:
        what = f": that is {found}, not this interpreter ({executable})"
    else:
        what = f", which has none (this interpreter is {executable})"
    return (
        f"Metaflow starts a local gang's other nodes as `{WORKER_PYTHON}` from PATH{what}; activate its environment "
        f"(e.g. `source .venv/bin/activate`) or put a directory whose `{WORKER_PYTHON}` is {executable} first on PATH"
    )
