"""What steps hand each other (data, models, reference log-probs, eval files, checkpoints) through Metaflow's own
datastore when pods share no filesystem: raw files via the datastore's storage backend (local, S3, Azure, GS; no
pickling), each upload closed by a manifest (sizes, SHA-256) that marks it complete and verifies every download."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
HANDOFF_DIR = "prefflow_handoff"  # under <datastore root>/<flow>/, beside Metaflow's own data/
CHUNK = 8 << 20


class HandoffError(RuntimeError):
    """A file a step needs is neither here nor (completely) in the datastore, or its download does not verify."""


@dataclass(frozen=True)
class StoreLocation:
    """A run's handoff area: the datastore (Metaflow's type and root) and the local output root it mirrors."""

    ds_type: str
    ds_root: str
    prefix: str  # "<flow>/prefflow_handoff/<run id of the output root>"
    output_root: str

    def as_dict(self) -> dict:
        return asdict(self)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _files_of(path: Path) -> dict[str, Path]:
    """{relative name: file} of a directory (every file below it), or {"": path} for a single file."""
    if path.is_file():
        return {"": path}
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}


def storage_backend(ds_type: str, ds_root: str) -> Any:
    """Metaflow's storage implementation for a datastore type (``local``, ``s3``, ``azure``, ``gs``) at ``ds_root``."""
    from metaflow.plugins import DATASTORES

    for impl in DATASTORES:
        if ds_type == impl.TYPE:
            return impl(ds_root)
    raise HandoffError(f"datastore type {ds_type!r} is not one Metaflow knows ({[d.TYPE for d in DATASTORES]})")


class ModelStore:
    """Push local files and directories to the run's handoff area and pull them back, verified, where needed."""

    def __init__(self, location: StoreLocation, storage: Any = None):
        self.location = location
        self.root = Path(location.output_root)
        self.storage = storage if storage is not None else storage_backend(location.ds_type, location.ds_root)

    @classmethod
    def from_dict(cls, spec: dict) -> ModelStore:
        return cls(StoreLocation(**spec))

    def key_for(self, path: Path | str) -> str:
        """The datastore key of a path under the local output root (the same relative path on every pod)."""
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root))
        except ValueError as exc:
            raise HandoffError(
                f"{path}: not under the run's output root {self.root}; only its files are handed off"
            ) from exc
        return f"{self.location.prefix}/{rel.as_posix()}".rstrip("/")

    def manifest(self, key: str) -> dict | None:
        """The manifest of a complete upload at ``key`` (None: nothing, or an upload that never finished)."""
        with self.storage.load_bytes([key + MANIFEST_SUFFIX]) as loaded:
            for _, local, _ in loaded:
                if local is None:
                    return None
                with open(local, encoding="utf-8") as fh:
                    return json.load(fh)
        return None

    def push(self, path: Path | str, key: str | None = None) -> dict:
        """Upload a file or a directory, then its manifest (the marker that the upload is complete)."""
        path = Path(path)
        key = key or self.key_for(path)
        if not path.exists():
            raise HandoffError(f"{path}: nothing to hand off (the step did not write it)")
        t0 = time.perf_counter()
        files = _files_of(path)
        entries: dict[str, dict[str, Any]] = {
            rel: {"size": f.stat().st_size, "sha256": _sha256(f)} for rel, f in files.items()
        }
        with contextlib.ExitStack() as stack:
            objs = [(f"{key}/{rel}" if rel else key, stack.enter_context(open(f, "rb"))) for rel, f in files.items()]
            self.storage.save_bytes(iter(objs), overwrite=True, len_hint=len(objs))
        manifest = {"kind": "file" if path.is_file() else "dir", "files": entries, "time": time.time()}
        self.storage.save_bytes(
            iter([(key + MANIFEST_SUFFIX, io.BytesIO(json.dumps(manifest).encode()))]), overwrite=True
        )
        size = sum(int(e["size"]) for e in entries.values())
        logger.info(
            "handoff: pushed %s (%d files, %.1f MB) to %s in %.1f s",
            path,
            len(files),
            size / 1e6,
            self.storage.full_uri(key),
            time.perf_counter() - t0,
        )
        return manifest

    def pull(self, path: Path | str, key: str | None = None, *, required: bool = True) -> bool:
        """Download ``key`` to ``path`` unless ``path`` is already here; every file checked against the manifest.

        Lands in a temp sibling first and is renamed into place, so a killed download leaves nothing half-done.
        Returns whether it downloaded."""
        path = Path(path)
        if path.exists():
            return False
        key = key or self.key_for(path)
        manifest = self.manifest(key)
        if manifest is None:
            if not required:
                return False
            raise HandoffError(
                f"{path}: not here and not in the datastore ({self.storage.full_uri(key)}{MANIFEST_SUFFIX} missing); "
                "the step that writes it did not finish, or it ran with resources.model_store: shared"
            )
        t0 = time.perf_counter()
        tmp = path.with_name(f".{path.name}.pull-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        files = manifest["files"]
        keys = {(f"{key}/{rel}" if rel else key): rel for rel in files}
        try:
            with self.storage.load_bytes(list(keys)) as loaded:
                for got_key, local, _ in loaded:
                    rel = keys[got_key]
                    if local is None:
                        raise HandoffError(f"{self.storage.full_uri(got_key)}: listed in the manifest but missing")
                    target = tmp / rel if rel else tmp
                    _copy_verified(Path(local), target, files[rel], self.storage.full_uri(got_key))
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, path)
            except OSError:  # a concurrent pull of the same files (gang nodes on one machine) got there first
                if not path.exists():
                    raise
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
        size = sum(e["size"] for e in files.values())
        logger.info(
            "handoff: pulled %s (%d files, %.1f MB) in %.1f s", path, len(files), size / 1e6, time.perf_counter() - t0
        )
        return True

    def ensure(self, path: Path | str) -> Path:
        """Make ``path`` present: pull it, or the nearest enclosing directory that was pushed."""
        path = Path(path)
        if path.exists():
            return path
        for candidate in [path, *path.parents]:
            if os.path.abspath(candidate) == os.path.abspath(self.root.parent):
                break
            if self.manifest(self.key_for(candidate)) is not None:
                self.pull(candidate)
                if path.exists():
                    return path
                break
        raise HandoffError(f"{path}: not here and not in the datastore under {self.location.prefix}")

    def ensure_all(self, *paths: str | Path | None) -> None:
        """:meth:`ensure` each path of this run (None and model specs outside the output root are not ours)."""
        for path in paths:
            if path is not None and self.owns(path):
                self.ensure(path)

    def owns(self, path: str | Path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(self.root))

    def children(self, key: str) -> list[str]:
        """Names directly under ``key`` in the datastore (directories and files; manifests included)."""
        found = self.storage.list_content([key])
        return sorted(self.storage.basename(item.path.rstrip("/")) for item in found)


def _copy_verified(source: Path, target: Path, entry: dict, where: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        while block := src.read(CHUNK):
            digest.update(block)
            dst.write(block)
    size = target.stat().st_size
    if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise HandoffError(
            f"{where}: downloaded {size} bytes with SHA-256 {digest.hexdigest()[:12]}..., the manifest says "
            f"{entry['size']} bytes, {entry['sha256'][:12]}...: the upload was overwritten or corrupted; rerun the "
            "step that wrote it"
        )


def running_task_datastore() -> tuple[str, str]:
    """The datastore (type, root) of the Metaflow task running this code: Metaflow records both in every task's
    metadata (``ds-type``, ``ds-root``, what its Client reads logs with), read here through the public Client API.

    One setup hides the task from it: local metadata with ``--datastore-root`` elsewhere than where Metaflow looks
    for ``.metaflow`` (Metaflow records the task under the one and reads under the other); the error says so."""
    from metaflow import current
    from metaflow.exception import MetaflowNotFound

    task = current.task
    if task is None:
        raise HandoffError("the datastore handoff is set up inside a running Metaflow step (start)")
    try:
        recorded = task.metadata_dict
    except MetaflowNotFound as exc:
        raise HandoffError(
            f"resources.model_store: datastore needs this run's datastore root, from the metadata of task "
            f"{current.pathspec}, which the Client API cannot find ({exc}); with local metadata, set "
            "METAFLOW_DATASTORE_SYSROOT_LOCAL instead of passing --datastore-root"
        ) from exc
    return recorded["ds-type"], recorded["ds-root"]


def handoff_location(handoff_mode: str, output_root: str, flow_name: str) -> dict | None:
    """Where a run hands files between steps: None (``resources.model_store`` resolved to shared), or the run's
    area in the datastore Metaflow keeps its artifacts in (a plain dict, an artifact of start): call it in a step."""
    if handoff_mode == "shared":
        return None
    ds_type, ds_root = running_task_datastore()
    prefix = f"{flow_name}/{HANDOFF_DIR}/{Path(output_root).name}"
    logger.info("handoff through the %s datastore at %s/%s", ds_type, ds_root, prefix)
    return StoreLocation(ds_type, ds_root, prefix, output_root).as_dict()


def node_root(output_root: str | Path, node_index: int) -> Path:
    """Where gang node ``node_index`` (> 0) keeps its share of a job (its checkpoint shards) when nodes share no
    disk: beside the run's output root, never inside it, so node 0 may reset that root."""
    root = Path(output_root)
    return root.with_name(f".{root.name}.node{node_index}")
