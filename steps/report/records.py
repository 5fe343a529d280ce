"""What the report reads from Metaflow's records (Client API), as plain data: one ``RunRecord`` per run.

Only this module talks to Metaflow; the table and plots take RunRecords (testable on hand-built ones)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from steps.evaluate.results import VariantResult
from steps.results import TrainResult

logger = logging.getLogger(__name__)

#: Step names of flows/pipeline.py the report reads.
JOIN_STEP = "join"
TRAIN_STEP = "preference"
ROUNDS_STEP = "evaluate"  # its round_outcomes: every on-policy round of a variant (none: [])


class ReportError(ValueError):
    """The report cannot be generated as asked (unknown flow, bad filter, missing datastore)."""


@dataclass(frozen=True)
class TrainingCurves:
    """One variant's training records as the report plots them: every optimizer step, every dev evaluation."""

    history: list[dict] = field(default_factory=list)
    dev_history: list[dict] = field(default_factory=list)


def curves_of(summary: TrainResult | Mapping[str, Any]) -> TrainingCurves:
    """The report's one reader of a training step's artifact: the :class:`steps.results.TrainResult` PrefFlow
    stores, or the plain dict runs stored before results were typed (``RunSummary.as_dict()``, the same names as
    keys; the report is regenerated from every earlier run, so those stay readable)."""
    if isinstance(summary, TrainResult):
        return TrainingCurves(summary.history, summary.dev_history)
    return TrainingCurves(list(summary.get("history") or []), list(summary.get("dev_history") or []))


@dataclass
class RunRecord:
    """One pipeline run as the report sees it."""

    flow: str
    run_id: str
    created_at: datetime  # timezone-aware, UTC
    tags: list[str]  # user tags, sorted
    system_tags: list[str]  # sorted
    successful: bool
    # join: one per model, typed (steps.evaluate.results.VariantResult), or a plain dict in runs made before that
    results: list[Any]
    run_config: dict = field(default_factory=dict)
    training_curves: dict[str, TrainingCurves] = field(default_factory=dict)  # variant -> its train_summary's
    # where the run wrote its files on the machine that ran it (join.output_root); the report states the paths
    # under it relative to it, so that a report made on one machine reads the same anywhere
    output_root: str | None = None

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run_id}"

    @property
    def output_root_name(self) -> str | None:
        """The output root as the run's config names it (``resources.output_dir/flow/run_id``, relative to the
        directory the run started in unless output_dir is absolute); None where the config does not say."""
        output_dir = (self.run_config.get("resources") or {}).get("output_dir")
        return str(PurePosixPath(output_dir, self.flow, self.run_id)) if isinstance(output_dir, str) else None

    def relative_path(self, path: Any) -> Any:
        """``path`` relative to the run's output root when it lies under it; anything else as it is."""
        if not isinstance(path, str) or not self.output_root or not os.path.isabs(path):
            return path
        relative = os.path.relpath(path, self.output_root)
        return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative

    @property
    def date(self) -> str:
        return self.created_at.strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Selection:
    """Which runs a report covers (recorded in the report so it says what it shows)."""

    flow: str = "PrefFlow"
    tags: tuple[str, ...] = ()
    namespace: str | None = None  # None: the global namespace (every user and deployment)
    latest: int | None = None
    include_runs: tuple[str, ...] = ()
    # which of the runs' rows are shown (``KEY=VALUE``, all must hold) and what they are grouped by
    # (steps.report.views): row fields such as loss_function, judge_endpoint or alpaca_eval_version
    row_filters: tuple[str, ...] = ()
    group_by: str | None = None

    def describe(self) -> str:
        """The filters in words (``include_runs`` left out: the same runs read the same either way)."""
        parts = [f"flow `{self.flow}`", f"namespace `{self.namespace}`" if self.namespace else "global namespace"]
        if self.tags:
            parts.append("tags " + ", ".join(f"`{t}`" for t in self.tags))
        if self.latest:
            parts.append(f"latest {self.latest} successful runs")
        else:
            parts.append("all successful runs")
        if self.row_filters:
            parts.append("rows with " + ", ".join(f"`{f}`" for f in self.row_filters))
        if self.group_by:
            parts.append(f"grouped by `{self.group_by}`")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- Metaflow client state


@contextlib.contextmanager
def client_scope(namespace: str | None, datastore_root: str | Path | None) -> Iterator[None]:
    """Switch the Client API's namespace (and, with ``datastore_root``, its metadata) for the block, then put back
    what the caller had, through Metaflow's public ``namespace()`` and ``metadata()`` calls.

    Both are process-wide, so a report generated inside a step or a test must not change what the caller's own
    Client calls see. ``metadata("local@DIR")`` also points the local datastore at ``DIR/.metaflow``, so
    restoring the caller's ``get_metadata()`` string restores where its artifacts are read from too. One case
    cannot be undone publicly: a caller whose local provider found no ``.metaflow`` at all (nothing to read)
    keeps the report's root afterwards; Metaflow has no public call that unsets a local root.
    """
    import metaflow

    previous_ns = metaflow.get_namespace()
    previous_md = metaflow.get_metadata() if datastore_root is not None else None
    try:
        if datastore_root is not None:
            root = Path(datastore_root).expanduser().resolve()
            if not (root / ".metaflow").is_dir():
                raise ReportError(
                    f"--datastore-root {root}: no .metaflow directory there; give the directory "
                    f"that holds .metaflow (what METAFLOW_DATASTORE_SYSROOT_LOCAL was set to)"
                )
            metaflow.metadata(f"local@{root}")
        metaflow.namespace(namespace)
        yield
    finally:
        metaflow.namespace(previous_ns)
        if previous_md is not None and previous_md != metaflow.get_metadata():
            _restore_metadata(previous_md)


def _restore_metadata(previous: str) -> None:
    import metaflow

    try:
        metaflow.metadata(previous)
    except ValueError:  # local@<no .metaflow found>: the caller had no datastore to return to
        logger.info(
            "Metaflow metadata was %r (no local datastore); it stays %s after the report",
            previous,
            metaflow.get_metadata(),
        )


# ----------------------------------------------------------------------------- reading runs


def _utc(dt: datetime) -> datetime:
    """Metaflow gives naive local datetimes; the report states dates in UTC."""
    return (dt if dt.tzinfo else dt.astimezone()).astimezone(timezone.utc)


def _artifact(task: Any, name: str, default: Any = None) -> Any:
    return task[name].data if name in task else default


def read_run(run: Any) -> RunRecord | None:
    """A Client ``Run`` -> RunRecord, or None (with a warning) when it never reached the join step."""
    from metaflow.exception import MetaflowNotFound

    try:
        join_task = run[JOIN_STEP].task
    except (KeyError, MetaflowNotFound):
        join_task = None
    if join_task is None or "results" not in join_task:
        logger.warning(
            "skipping %s: it has no '%s' step with a 'results' artifact (failed before the join?)",
            run.pathspec,
            JOIN_STEP,
        )
        return None
    curves: dict[str, TrainingCurves] = {}
    try:
        train_tasks = list(run[TRAIN_STEP])
    except (KeyError, MetaflowNotFound):
        train_tasks = []
    for task in train_tasks:
        variant = _artifact(task, "variant")
        summary = _artifact(task, "train_summary")
        if isinstance(variant, dict):  # {name, loss, overrides}: a loss or a sweep point
            variant = variant.get("name")
        if variant is not None and summary:
            curves[str(variant)] = curves_of(summary)
    curves.update(_round_curves(run))
    flow_name, run_id = run.pathspec.split("/")
    record = RunRecord(
        flow=flow_name,
        run_id=run_id,
        created_at=_utc(run.created_at),
        tags=sorted(run.user_tags),
        system_tags=sorted(run.system_tags),
        successful=bool(run.successful),
        results=[r if isinstance(r, VariantResult) else dict(r) for r in (_artifact(join_task, "results") or [])],
        run_config=dict(_artifact(join_task, "run_config") or {}),
        training_curves=curves,
        output_root=_artifact(join_task, "output_root"),
    )
    logger.info("read %s: %d results, %d training histories", run.pathspec, len(record.results), len(curves))
    return record


def _round_curves(run: Any) -> dict[str, TrainingCurves]:
    """Each on-policy round's training curves, by its row's variant (none where the run has no rounds)."""
    from metaflow.exception import MetaflowNotFound

    try:
        done = list(run[ROUNDS_STEP])
    except (KeyError, MetaflowNotFound):
        return {}
    return {o.result.variant: curves_of(o.train) for task in done for o in _artifact(task, "round_outcomes") or []}


def _as_run(spec: Any, flow_name: str) -> Any:
    from metaflow import Run
    from metaflow.exception import MetaflowNotFound

    if not isinstance(spec, str):
        return spec  # already a Client Run
    pathspec = spec if "/" in spec else f"{flow_name}/{spec}"
    try:
        return Run(pathspec, _namespace_check=False)
    except MetaflowNotFound as exc:
        raise ReportError(
            f"include_runs: run {pathspec!r} not found in the Metaflow metadata; pass an existing Flow/run_id"
        ) from exc


def select_runs(selection: Selection, include_runs: Sequence = ()) -> list[RunRecord]:
    """The runs a report covers: successful runs matching the filters, newest ``latest``, plus extras.

    Call inside ``client_scope``. ``include_runs`` (pathspecs or Client Runs) are added whatever their
    state, e.g. the current run whose ``end`` step has not finished. Ordered oldest first.
    """
    from metaflow import Flow
    from metaflow.exception import MetaflowNamespaceMismatch, MetaflowNotFound

    if selection.latest is not None and selection.latest < 1:
        raise ReportError(f"latest: got {selection.latest}; give a positive number of runs (or none for all)")
    try:
        flow = Flow(selection.flow)
    except MetaflowNotFound as exc:
        if not include_runs:
            scope = "global namespace" if selection.namespace is None else f"namespace {selection.namespace!r}"
            raise ReportError(
                f"no Metaflow records of flow {selection.flow!r} in the {scope}"
                f" ({_metadata_description()}); run the pipeline first, or point at its datastore "
                f"with --datastore-root DIR / METAFLOW_DATASTORE_SYSROOT_LOCAL"
            ) from exc
        flow = None
    except MetaflowNamespaceMismatch:
        logger.warning("flow %s has no runs in namespace %r", selection.flow, selection.namespace)
        flow = None
    candidates = []
    if flow is not None:
        for run in flow.runs(*selection.tags):
            if run.successful:
                candidates.append(run)
    candidates.sort(key=lambda r: (_utc(r.created_at), r.id), reverse=True)
    if selection.latest is not None:
        candidates = candidates[: selection.latest]
    chosen = {r.pathspec: r for r in candidates}
    for spec in include_runs:
        run = _as_run(spec, selection.flow)
        chosen.setdefault(run.pathspec, run)
    records = [rec for rec in (read_run(r) for r in chosen.values()) if rec is not None]
    records.sort(key=lambda rec: (rec.created_at, rec.run_id))
    logger.info("selected %d runs (%s)", len(records), selection.describe())
    return records


def _metadata_description() -> str:
    import metaflow

    return f"metadata {metaflow.get_metadata()}"
