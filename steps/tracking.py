"""Experiment tracking: every training and evaluation metric to TensorBoard, MLflow and/or W&B (any subset).

A ``Tracker`` is a no-op without backends and on ranks other than 0; secrets come only from the environment.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from steps.locks import file_lock

logger = logging.getLogger(__name__)

#: Backend name -> (module imported, pip package that provides it).
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
#: Config keys never sent to a tracker (credentials belong in the environment, where each client reads them).
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|credential)", re.IGNORECASE)
MLFLOW_PARAM_MAX_CHARS = 6000  # MLflow's limit on a parameter value
MLFLOW_BATCH = 100  # MLflow's limit on parameters per log_batch call


class TrackingError(ValueError):
    """A tracking backend that is unknown, not installed, or cannot start (with what to do about it)."""


def check_backends(backends: Sequence[str], where: str = "tracking.backends") -> list[str]:
    """The backend names, deduplicated in order; TrackingError naming ``where`` for an unknown one."""
    if isinstance(backends, str) or not isinstance(backends, Sequence):
        raise TrackingError(f"{where}: expected a list of backend names, got {backends!r}; e.g. [tensorboard, mlflow]")
    for name in backends:
        if name not in BACKENDS:
            raise TrackingError(f"{where}: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return list(dict.fromkeys(backends))


def process_rank() -> int:
    """This process's rank: torch.distributed's once initialised, else torchrun's RANK variable, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def flatten(mapping: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested mappings as one level, keys joined with ``sep``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def scalar_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``prefix/key`` -> float for every number in ``metrics`` (nested ones flattened); the step, text and
    booleans are left out, NaN/inf kept (a diverging loss is worth seeing). A key already carrying the prefix
    (the loop's dev records say ``dev_loss``) is not prefixed twice: ``dev/loss``."""
    out = {}
    for key, value in flatten(metrics).items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, Real):
            continue
        out[f"{prefix}/{key.removeprefix(prefix + '_')}"] = float(value)
    return out


def public_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` without secret-looking keys (at any depth), as JSON-able values."""
    if not config:
        return {}

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)

    return clean(config)


def _require(backend: str) -> Any:
    module, package = BACKENDS[backend]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackingError(
            f"tracking backend {backend!r} needs the {package!r} package, which is not installed: "
            f"pip install 'prefflow[tracking]' (or pip install {package}), or remove {backend!r} from "
            f"tracking.backends"
        ) from exc


def _tag_filter(group: str) -> str:
    quoted = group.replace("'", "")
    return f"tags.`prefflow.group` = '{quoted}'"


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:64] or "run"


class _TensorBoard:
    """Event files under ``log_dir/tensorboard/<run name>`` (``tensorboard --logdir log_dir/tensorboard``)."""

    def __init__(self, log_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.dir = log_dir / TENSORBOARD_DIR / _safe_id(run_name)
        self.writer = SummaryWriter(log_dir=str(self.dir))
        if config:
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def describe(self) -> str:
        return f"TensorBoard {self.dir}"


class _MLflow:
    """One MLflow run per (group, run name) in the experiment ``project``; a file store under
    ``log_dir/mlruns`` unless MLFLOW_TRACKING_URI names a server or database."""

    def __init__(self, log_dir: Path, run_name: str, group: str | None, project: str, config: dict[str, Any]):
        _require("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        local = not uri
        if not uri:
            store = (log_dir / MLFLOW_DIR).resolve()
            store.mkdir(parents=True, exist_ok=True)
            uri = store.as_uri()
            # MLflow 3 keeps its file store only behind this opt-in (a database backend needs sqlalchemy)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        tags = {"prefflow.run": run_name, **({"prefflow.group": group} if group else {})}
        # parallel foreach branches share one file store: create the experiment (and find runs) one at a time
        lock = file_lock(log_dir / ".mlflow.lock", "mlflow experiment") if local else contextlib.nullcontext()
        with lock:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            found = []
            if group:
                candidates = self.client.search_runs([experiment_id], filter_string=_tag_filter(group))
                found = [r for r in candidates if r.data.tags.get("prefflow.run") == run_name]
            if found:  # the evaluate step (or a retry) adds to the run its training step opened
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                name = f"{group}/{run_name}" if group else run_name
                self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
                params = [
                    Param(key[:250], json.dumps(v) if not isinstance(v, str) else v)
                    for key, v in flatten(config, sep=".").items()
                ]
                params = [Param(p.key, p.value[:MLFLOW_PARAM_MAX_CHARS]) for p in params]
                for start in range(0, len(params), MLFLOW_BATCH):
                    self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

    def describe(self) -> str:
        return f"MLflow run {self.run_id} at {self.uri}"


class _WandB:
    """A W&B run (id from group and run name, so the evaluate step resumes its training run); WANDB_MODE,
    WANDB_API_KEY and the rest are read by wandb itself from the environment."""

    def __init__(self, log_dir: Path, run_name: str, group: str | None, project: str, config: dict[str, Any]):
        wandb = _require("wandb")
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or project,
                name=f"{group}/{run_name}" if group else run_name,
                group=group,
                id=_safe_id(f"{group}-{run_name}") if group else None,
                resume="allow" if group else None,
                dir=str(log_dir),
                config=config,
                reinit="create_new",
            )
        except Exception as exc:  # wandb raises its own UsageError/CommError types
            raise TrackingError(
                f"tracking backend 'wandb' could not start a run ({exc}); set WANDB_API_KEY in the environment "
                f"(or run `wandb login`), or WANDB_MODE=offline to log locally and `wandb sync` later"
            ) from exc

    def log(self, values: dict[str, float], step: int) -> None:
        if step >= self.run.step:
            self.run.log(values, step=step)
        else:  # W&B steps only grow, and a resumed online run continues from its last one: log at the current step
            self.run.log(values)

    def close(self) -> None:
        self.run.finish()

    def describe(self) -> str:
        return f"W&B run {self.run.id} ({self.run.settings.mode}) in {self.run.dir}"


class Tracker:
    """Sends metrics to each configured backend; a no-op without backends or off rank 0.

    ``log_dir`` holds the local files of every run of one pipeline run (TensorBoard's ``tensorboard/``, the MLflow
    file store ``mlruns/``, W&B's ``wandb/``); ``run_name`` is one training/evaluation unit (a variant) and
    ``group`` the pipeline run it belongs to. A failing backend call is logged, never fatal: metrics.jsonl
    remains the record.
    """

    def __init__(
        self,
        backends: Sequence[str],
        *,
        run_name: str,
        log_dir: str | Path,
        group: str | None = None,
        project: str = "prefflow",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.names = check_backends(backends)
        self.rank = process_rank()
        self._backends: dict[str, Any] = {}
        self._failures: dict[str, int] = {}
        self._closed = False
        if not self.names or self.rank != 0:
            return
        log_dir, cfg = Path(log_dir), public_config(config)
        try:
            for name in self.names:
                if name == "tensorboard":
                    self._backends[name] = _TensorBoard(log_dir, run_name, cfg)
                elif name == "mlflow":
                    self._backends[name] = _MLflow(log_dir, run_name, group, project, cfg)
                else:
                    self._backends[name] = _WandB(log_dir, run_name, group, project, cfg)
        except BaseException:
            self.close()
            raise
        for backend in self._backends.values():
            logger.info("tracking %s to %s", run_name, backend.describe())

    @property
    def enabled(self) -> bool:
        return bool(self._backends) and not self._closed

    def log(self, metrics: Mapping[str, Any], step: int, prefix: str) -> None:
        """Every number in ``metrics`` as ``prefix/<key>`` at ``step`` (the loop's record, dev or eval metrics)."""
        if not self.enabled:
            return
        if not prefix or not isinstance(prefix, str):
            raise TrackingError(f"prefix must be a non-empty string such as 'train', got {prefix!r}")
        values = scalar_metrics(metrics, prefix)
        if not values:
            return
        for name, backend in self._backends.items():
            try:
                backend.log(values, int(step))
            except Exception as exc:
                self._failures[name] = self._failures.get(name, 0) + 1
                if self._failures[name] == 1:
                    logger.warning("tracking: %s failed to log step %d (%s); training goes on", name, step, exc)

    def close(self) -> None:
        """Flush and finish every backend's run (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for name, backend in self._backends.items():
            try:
                backend.close()
            except Exception as exc:
                logger.warning("tracking: closing %s failed: %s", name, exc)
            if self._failures.get(name):
                logger.warning("tracking: %s failed on %d log calls", name, self._failures[name])

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
