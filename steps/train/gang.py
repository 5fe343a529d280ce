"""One training job over a Metaflow ``@parallel`` gang: each node's torchrun joins node 0's rendezvous, and a small
store on node 0 (the next port) orders the nodes' start (node 0 picks the checkpoint every node resumes from) and
stops every node as soon as one fails, with that node's error, instead of leaving the others hanging."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOCAL_PORTS = (20000, 45000)  # where local gangs (every node on this machine) pick their rendezvous port
PLAN_WAIT_S = 7 * 24 * 3600.0


class GangFailedError(RuntimeError):
    """A node of the gang failed (its own torchrun, or another node's); the message names the node and why."""


@dataclass(frozen=True)
class Gang:
    """This node's place in a gang (from ``current.parallel``) and the rendezvous port on the main node."""

    num_nodes: int
    node_index: int
    main_ip: str
    port: int  # torchrun's rendezvous; port + 1 is the gang's coordination store

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
    if "MF_MASTER_PORT" in os.environ:
        port = int(os.environ["MF_MASTER_PORT"])
    elif par.main_ip in LOOPBACK:
        port = local_port(current.run_id, current.step_name, par.control_task_id, current.retry_count)
    else:
        port = master_port
    return Gang(num_nodes=par.num_nodes, node_index=par.node_index, main_ip=par.main_ip, port=port)


def gang_summary(summaries: list[dict | None], enabled: bool, what: str) -> dict | None:
    """The gang's run summary: the one node 0 returned (global rank 0 trained there and wrote the model)."""
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
    """A TCPStore served by node 0's step process: the start plan, checkpoint flags and each node's outcome."""

    def __init__(self, gang: Gang, timeout_s: float):
        import torch.distributed as dist

        self.gang = gang
        self.timeout_s = timeout_s
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
        self._call("publishing the plan", lambda: self.store.set("plan", json.dumps(plan)))

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
        return {i: o for i, o in self.outcomes().items() if o.startswith("failed")}

    def wait_for_others(self, timeout_s: float) -> dict[int, str]:
        """Node 0 keeps the store up until every node reported (or ``timeout_s``): a node still uploading its
        checkpoint shards needs it."""
        deadline = time.monotonic() + timeout_s
        seen: dict[int, str] = {}
        while time.monotonic() < deadline:
            try:
                seen = self.outcomes()
            except GangFailedError:
                break
            if len(seen) == self.gang.num_nodes - 1:
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
