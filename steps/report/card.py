"""The report inside Metaflow: card components and the call the pipeline's ``report`` step makes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from steps.report.generate import ReportPaths, generate_report


def report_card(paths: ReportPaths, run_pathspec: str | None = None) -> list:
    """Card components: the results table, the LC WR / WR bars and this run's training curves."""
    from metaflow.cards import Image, Markdown

    n_runs = len(paths.runs)
    table = paths.card_markdown or "_No rows._"
    parts: list = [
        Markdown(
            f"## Results report\n\n{n_runs} run{'s' if n_runs != 1 else ''}, {paths.n_rows} models; "
            f"full report with config snapshots in `{paths.readme}`.\n\n" + table
        )
    ]
    if paths.win_rates_png and Path(paths.win_rates_png).is_file():
        parts.append(Image(Path(paths.win_rates_png).read_bytes(), label="LC WR and WR across runs (± 1 s.e.)"))
    training = paths.training_pngs.get(run_pathspec) if run_pathspec else None
    if training and Path(training).is_file():
        parts.append(Image(Path(training).read_bytes(), label=f"training curves of {run_pathspec}"))
    return parts


def report_for_current_run(
    flow_name: str | None = None,
    out_dir: str | Path | None = None,
    include_runs: Sequence | None = None,
    latest: int | None = None,
) -> ReportPaths:
    """Regenerate the report from inside a running step.

    ``flow_name`` defaults to the running flow, whose current run is then included even though its
    ``end`` has not run. Under ``@project`` only runs of the same project branch are read, so a
    production report never mixes in personal or test deployments.
    """
    from metaflow import current

    tags = []
    if current.get("project_name"):
        tags = [f"project:{current.get('project_name')}", f"project_branch:{current.get('branch_name')}"]
    include = list(include_runs or [])
    if flow_name is None:
        include.append(f"{current.flow_name}/{current.run_id}")
    return generate_report(
        flow_name=flow_name or str(current.flow_name),
        out_dir=out_dir,
        tags=tags,
        namespace=None,
        latest=latest,
        include_runs=include,
    )
