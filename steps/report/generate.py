"""Write the report directory (results.md/.csv/.json, README.md, plots, config snapshots), rebuilt each time.
Rendered in memory, then, under ``.report.lock``, every changed file is staged and fsynced before any is replaced
(a full disk replaces nothing), so concurrent jobs never tear a file; stale managed files go last.

One writer, :func:`write_report`, behind every entry point; they differ only in which runs they read:
``python -m steps.report`` (:func:`generate_report`, the command line's filters), the pipeline's ``report`` step
and flows/report.py (:func:`report_in_step`: the running flow's project branch, the current or triggering run
included, then the step's card)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from steps.io import atomic_write_files
from steps.locks import file_lock
from steps.report.plots import benchmark_bars_png, training_curves_png, win_rate_bars_png, win_rate_by_round_png
from steps.report.records import RunRecord, Selection, client_scope, select_runs
from steps.report.table import (
    ResultRow,
    build_rows,
    generated_from,
    markdown_page,
    markdown_table,
    notes_section,
    results_csv,
    results_json,
    results_markdown,
    safe_name,
    table_or_none,
)
from steps.report.views import select_rows

logger = logging.getLogger(__name__)

REPORT_DIR_ENV = "PREFFLOW_REPORT_DIR"
#: Subdirectories whose files the report owns (stale ones are removed on regeneration).
MANAGED_DIRS = {"configs": ".yaml", "plots": ".png"}
LOCK_NAME = ".report.lock"
WIN_RATES_PNG = "plots/win_rates.png"
ROUNDS_PNG = "plots/win_rate_by_round.png"
BENCHMARKS_PNG = "plots/benchmarks.png"


def default_report_dir() -> Path:
    """``$PREFFLOW_REPORT_DIR`` if set, else ``reports/`` of the working directory (where the user runs)."""
    env = os.environ.get(REPORT_DIR_ENV)
    return Path(env) if env else Path.cwd() / "reports"


@dataclass
class ReportPaths:
    """Where a generated report's files are, and what it covered."""

    out_dir: Path
    results_md: Path
    results_csv: Path
    results_json: Path
    readme: Path
    win_rates_png: Path | None
    benchmarks_png: Path | None = None  # IFBench / lm-eval bars, beside the win-rate plot
    training_pngs: dict[str, Path] = field(default_factory=dict)  # run pathspec -> PNG
    config_snapshots: list[Path] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # run pathspecs, oldest first
    n_rows: int = 0
    card_markdown: str = ""  # the table without links (for Metaflow cards)

    def to_dict(self) -> dict:
        """Plain strings only: safe to store as a Metaflow artifact and read without this package."""
        return {
            "out_dir": str(self.out_dir),
            "results_md": str(self.results_md),
            "results_csv": str(self.results_csv),
            "results_json": str(self.results_json),
            "readme": str(self.readme),
            "win_rates_png": str(self.win_rates_png) if self.win_rates_png else None,
            "benchmarks_png": str(self.benchmarks_png) if self.benchmarks_png else None,
            "training_pngs": {k: str(v) for k, v in self.training_pngs.items()},
            "config_snapshots": [str(p) for p in self.config_snapshots],
            "runs": list(self.runs),
            "n_rows": self.n_rows,
        }


def training_png_name(record: RunRecord) -> str:
    return f"plots/training-{safe_name(record.flow)}-{safe_name(record.run_id)}.png"


def config_snapshot_yaml(record: RunRecord, row: ResultRow) -> str:
    """The exact config a model was trained with: its resolved training section and the run's full config."""
    doc = {
        "flow": record.flow,
        "run_id": record.run_id,
        "variant": row.variant,
        "training_config": row.training_section,
        "run_config": record.run_config,
    }
    header = (
        f"# Config snapshot of {record.pathspec}, variant {row.variant}: written by steps.report "
        f"from the run's Metaflow artifacts (join.results[].training_config and join.run_config).\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False)


def readme_markdown(
    rows: list[ResultRow],
    records: list[RunRecord],
    selection: Selection,
    training: dict[str, str],
    win_rates: str | None,
    by_round: str | None = None,
    benchmarks: str | None = None,
) -> str:
    parts = [
        "# PrefFlow results report",
        "",
        f"{generated_from(selection)}. "
        "Do not edit: regenerating replaces this file. Tables only: [results.md](results.md), "
        "[results.csv](results.csv), [results.json](results.json).",
        "",
        "## Results",
        "",
        table_or_none(rows, selection.group_by),
    ]
    if win_rates:
        parts += [
            "## LC WR and WR across runs",
            "",
            "Bars: AlpacaEval 2 length-controlled (LC WR) and raw (WR) win rate against the reference, "
            "error bars one standard error.",
            "",
            f"![LC WR and WR across runs]({win_rates})",
            "",
        ]
    if by_round:
        parts += [
            "## Win rate by on-policy round",
            "",
            "Each on-policy variant's WR (and LC WR where scored) by round; round 0 is the model round 1 started "
            "from. Error bars one standard error.",
            "",
            f"![win rate by on-policy round]({by_round})",
            "",
        ]
    if benchmarks:
        parts += [
            "## Benchmarks across runs",
            "",
            "Bars: IFBench prompt- and instruction-level accuracy (strict and loose; verified by code, no judge) and "
            "the lm-evaluation-harness tasks' rates, error bars one standard error.",
            "",
            f"![Benchmarks across runs]({benchmarks})",
            "",
        ]
    if training:
        parts += [
            "## Training curves",
            "",
            "Per optimizer step (lines) and on the dev set (circles): SFT loss, preference loss, reward "
            "margin and reward accuracy.",
            "",
        ]
        for record in records:
            if record.pathspec in training:
                parts += [
                    f"### `{record.pathspec}` ({record.date})",
                    "",
                    f"![training curves of {record.pathspec}]({training[record.pathspec]})",
                    "",
                ]
    return markdown_page(parts + notes_section(rows))


def render_report(records: list[RunRecord], selection: Selection) -> tuple[dict[str, bytes], dict]:
    """All report files as {relative path: bytes}, plus what ReportPaths needs. No I/O."""
    rows = select_rows(build_rows(records), selection.row_filters, selection.group_by)
    files: dict[str, bytes] = {}
    runs = {record.pathspec: record for record in records}
    for row in rows:
        files[row.config_snapshot] = config_snapshot_yaml(runs[row.pathspec], row).encode("utf-8")
    training: dict[str, str] = {}
    for record in records:
        png = training_curves_png(record)
        if png is not None:
            training[record.pathspec] = training_png_name(record)
            files[training[record.pathspec]] = png
    bars = win_rate_bars_png(rows)
    if bars is not None:
        files[WIN_RATES_PNG] = bars
    by_round = win_rate_by_round_png(rows)
    if by_round is not None:
        files[ROUNDS_PNG] = by_round
    benchmark_bars = benchmark_bars_png(rows)
    if benchmark_bars is not None:
        files[BENCHMARKS_PNG] = benchmark_bars
    files["results.md"] = results_markdown(rows, selection, len(records)).encode("utf-8")
    files["results.csv"] = results_csv(rows).encode("utf-8")
    files["results.json"] = results_json(rows, records, selection).encode("utf-8")
    files["README.md"] = readme_markdown(
        rows,
        records,
        selection,
        training,
        WIN_RATES_PNG if bars is not None else None,
        ROUNDS_PNG if by_round is not None else None,
        BENCHMARKS_PNG if benchmark_bars is not None else None,
    ).encode("utf-8")
    info = {"rows": rows, "training": training, "win_rates": bars is not None, "benchmarks": benchmark_bars is not None}
    return files, info


def _write_files(out_dir: Path, files: dict[str, bytes]) -> tuple[int, int]:
    """Changed files all staged first (an error while writing, ENOSPC included, replaces none), then renamed;
    only then are stale managed files removed, so a failed write never takes rows away."""
    changed = {}
    for rel, data in sorted(files.items()):
        path = out_dir / rel
        if not (path.is_file() and path.read_bytes() == data):
            changed[path] = data
    # the tables last: a reader that sees the new results.* also finds the snapshots and plots they link to
    order = sorted(changed, key=lambda p: (p.parent == out_dir and p.name.startswith("results."), str(p)))
    atomic_write_files({p: changed[p] for p in order})
    written, removed = len(changed), 0
    for sub, suffix in MANAGED_DIRS.items():
        folder = out_dir / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            rel = f"{sub}/{path.name}"
            if path.is_file() and path.name.endswith(suffix) and rel not in files:
                path.unlink()
                removed += 1
    return written, removed


def write_report(records: list[RunRecord], selection: Selection, out_dir: str | Path) -> ReportPaths:
    """Render the report for ``records`` and write it to ``out_dir`` (locked, atomic, idempotent)."""
    out_dir = Path(out_dir)
    files, info = render_report(records, selection)
    out_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir / LOCK_NAME, f"report in {out_dir}"):
        written, removed = _write_files(out_dir, files)
    logger.info(
        "report for %d runs, %d models in %s: %d files written, %d unchanged, %d stale removed",
        len(records),
        len(info["rows"]),
        out_dir,
        written,
        len(files) - written,
        removed,
    )
    return ReportPaths(
        out_dir=out_dir,
        results_md=out_dir / "results.md",
        results_csv=out_dir / "results.csv",
        results_json=out_dir / "results.json",
        readme=out_dir / "README.md",
        win_rates_png=out_dir / WIN_RATES_PNG if info["win_rates"] else None,
        benchmarks_png=out_dir / BENCHMARKS_PNG if info["benchmarks"] else None,
        training_pngs={k: out_dir / v for k, v in info["training"].items()},
        config_snapshots=sorted(out_dir / k for k in files if k.startswith("configs/")),
        runs=[r.pathspec for r in records],
        n_rows=len(info["rows"]),
        card_markdown=markdown_table(info["rows"], links=False),
    )


def generate_report(
    selection: Selection | None = None,
    out_dir: str | Path | None = None,
    datastore_root: str | Path | None = None,
    include_runs: Sequence = (),
) -> ReportPaths:
    """Regenerate the results report from Metaflow's records of the runs ``selection`` picks (default: every
    successful PrefFlow run in the global namespace; steps.report.records.Selection).

    ``include_runs`` (pathspecs or Client Runs, whatever their state: the pipeline passes its own unfinished run)
    are added to ``selection.include_runs``. ``datastore_root``: the directory holding a local ``.metaflow``
    (default: Metaflow's own configuration). ``out_dir`` defaults to ``default_report_dir()``. The selection's
    ``row_filters`` and ``group_by`` (steps.report.views) are checked before any run is read.
    """
    selection = selection or Selection()
    include = [*selection.include_runs, *include_runs]
    selection = dataclasses.replace(
        selection,
        tags=tuple(selection.tags),
        include_runs=tuple(r if isinstance(r, str) else r.pathspec for r in include),
        row_filters=tuple(selection.row_filters),
    )
    select_rows([], selection.row_filters, selection.group_by)  # a bad key fails before Metaflow is read
    with client_scope(selection.namespace, datastore_root):
        records = select_runs(selection, include)
    return write_report(records, selection, default_report_dir() if out_dir is None else out_dir)


def report_in_step(
    flow_name: str | None = None,
    out_dir: str | Path | None = None,
    triggering_run: str | None = None,
    latest: int | None = None,
) -> dict:
    """The report step of flows/pipeline.py and of flows/report.py: regenerate the report from inside a running
    step, add it to the step's card, and return where its files are (``ReportPaths.to_dict()``, the step's
    ``report_files`` artifact).

    ``flow_name`` None (the pipeline): the running flow, its current run included although its ``end`` has not
    run, and the card shows that run's training curves. ``flow_name`` given (the report flow): that flow's runs plus
    ``triggering_run``, whose curves the card shows (else the newest run's). Under ``@project`` only runs of the same
    project branch are read, so a production report never mixes in personal or test deployments.
    """
    from metaflow import current

    from steps.cards import report_card

    tags = []
    if current.get("project_name"):
        tags = [f"project:{current.get('project_name')}", f"project_branch:{current.get('branch_name')}"]
    this_run = f"{current.flow_name}/{current.run_id}"
    include = [this_run] if flow_name is None else [triggering_run] if triggering_run else []
    selection = Selection(flow=flow_name or str(current.flow_name), tags=tuple(tags), namespace=None, latest=latest)
    paths = generate_report(selection, out_dir, include_runs=include)
    card_run = this_run if flow_name is None else triggering_run or (paths.runs[-1] if paths.runs else None)
    current.card.extend(report_card(paths, card_run))  # type: ignore[attr-defined]  # set by @card at run time
    return paths.to_dict()
