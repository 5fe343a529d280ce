"""Resumable training state through the datastore when nodes share no disk: every node uploads its own DCP shards of
each checkpoint (node 0 also the metadata, trainer state and marker) and the reference log-prob cache; at the start
every node downloads the same state, the latest checkpoint all nodes finished uploading, which node 0 picks."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from steps.model_store import HandoffError, ModelStore
from steps.train.gang import Gang, GangCoordinator, GangFailedError

logger = logging.getLogger(__name__)

LATEST = "latest_checkpoint"  # the gang store's value: node 0's newest complete checkpoint step
REFERENCE_CACHE = "reference_logps.json"  # what steps.train.recipes.run_preference caches in its out dir
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_DIR = re.compile(r"^\.step_(\d+)\.tmp$")  # how a rank that is not rank 0 leaves its shards on its own disk


class CheckpointSync:
    """This node's side: ``prepare`` before torchrun starts, ``poll`` while it runs, ``flush`` when it ends."""

    def __init__(
        self,
        store: ModelStore,
        local_dir: Path,
        remote_dir: Path,
        gang: Gang | None = None,
        coordinator: GangCoordinator | None = None,
    ):
        self.store = store
        self.local = Path(local_dir) / "checkpoints"
        self.key = store.key_for(Path(remote_dir) / "checkpoints")
        self.ref_local = Path(local_dir) / REFERENCE_CACHE
        self.ref_key = store.key_for(Path(remote_dir) / REFERENCE_CACHE)
        self.gang, self.coordinator = gang, coordinator
        self.node = gang.node_index if gang else 0
        self.num_nodes = gang.num_nodes if gang else 1
        self.pushed: set[int] = set()
        self.ref_pushed = False

    def complete_steps(self) -> list[int]:
        """Checkpoint steps in the datastore for which every node's part is complete."""
        steps = []
        for name in self.store.children(self.key):
            match = STEP_DIR.match(name)
            if match and all(
                self.store.manifest(f"{self.key}/{name}/node_{i}") is not None for i in range(self.num_nodes)
            ):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def prepare(self, plan: dict | None = None) -> dict:
        """Make this node's resumable state the datastore's: node 0 picks (``plan`` None), the others follow."""
        if plan is None:
            steps = self.complete_steps()
            plan = {
                "checkpoint": steps[-1] if steps else None,
                "reference_cache": self.store.manifest(self.ref_key) is not None,
            }
        shutil.rmtree(self.local, ignore_errors=True)  # a previous attempt's leftovers: the datastore decides
        if self.ref_local.exists():
            self.ref_local.unlink()
        if plan["reference_cache"]:
            self.store.pull(self.ref_local, self.ref_key)
            self.ref_pushed = True
        step = plan["checkpoint"]
        if step is not None:
            self._pull_step(int(step))
            self.pushed.add(int(step))
        logger.info(
            "checkpoint sync (node %d): resuming from %s, reference cache %s",
            self.node,
            f"step {step}" if step is not None else "the start",
            "from the datastore" if plan["reference_cache"] else "to compute",
        )
        return plan

    def _pull_step(self, step: int) -> None:
        name = f"step_{step:07d}"
        staging = self.local / f".pull-{name}"
        final = self.local / name
        for i in range(self.num_nodes):
            self.store.pull(staging / f"node_{i}", f"{self.key}/{name}/node_{i}")
        moves = [
            (src, final / src.relative_to(part))
            for part in sorted(staging.iterdir())
            for src in sorted(p for p in part.rglob("*") if p.is_file())
        ]
        # the marker last: a checkpoint is trusted only once every shard is in place
        for src, dst in sorted(moves, key=lambda m: m[1].name == "COMPLETE"):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        shutil.rmtree(staging, ignore_errors=True)

    def poll(self) -> bool:
        """Upload what is new: node 0 its complete checkpoints (announcing the newest to the others) and the
        reference cache; another node its shards of the newest checkpoint node 0 announced (older ones were
        rotated away before node 0 saw them complete: dropped). False: node 0 is gone."""
        try:
            if self.node == 0:
                self._poll_main()
            else:
                self._poll_other()
        except (FileNotFoundError, HandoffError) as exc:  # rotated away mid-upload (keep_checkpoints): next one
            logger.warning("checkpoint sync (node %d): skipped an upload: %s", self.node, exc)
        except GangFailedError as exc:
            logger.warning("checkpoint sync (node %d): %s", self.node, exc)
            return False
        return True

    def _poll_main(self) -> None:
        if not self.ref_pushed and self.ref_local.exists():
            self.store.push(self.ref_local, self.ref_key)
            self.ref_pushed = True
        if not self.local.is_dir():
            return
        for path in sorted(self.local.iterdir()):
            match = STEP_DIR.match(path.name)
            if not match or int(match.group(1)) in self.pushed or not (path / "COMPLETE").exists():
                continue
            step = int(match.group(1))
            if self.coordinator is not None:  # every shard of it is written: the others upload theirs
                self.coordinator.set_value(LATEST, str(step))
            self.store.push(path, f"{self.key}/{path.name}/node_0")
            self.pushed.add(step)

    def _poll_other(self) -> None:
        if not self.local.is_dir() or self.coordinator is None:
            return
        latest = self.coordinator.get_value(LATEST)
        if latest is None:
            return
        for path in sorted(self.local.iterdir()):
            match = TMP_DIR.match(path.name)
            if not match or int(match.group(1)) > int(latest):
                continue
            step = int(match.group(1))
            if step == int(latest):
                self.store.push(path, f"{self.key}/step_{step:07d}/node_{self.node}")
                self.pushed.add(step)
            shutil.rmtree(path, ignore_errors=True)  # older: node 0 rotated it away before it could be flagged

    def flush(self, wait_s: float = 30.0) -> None:
        """Upload what remains; another node waits (up to ``wait_s``) for node 0 to announce its last checkpoint."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = self.poll()
            pending = sorted(self.local.glob(".step_*.tmp")) if self.node and self.local.is_dir() else []
            if not pending or not alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if self.node and pending:
            logger.warning("checkpoint sync (node %d): %s never completed on node 0; not uploaded", self.node, pending)
