"""Results report from Metaflow's own records: tables, plots, config snapshots (``python -m steps.report``).

``generate_report(Selection(tags=(...), latest=5))`` writes results.md/.csv/.json, README.md, plots/ and configs/;
the flows' report steps call ``report_in_step``; both end in ``write_report``. Its card components are in
steps.cards."""

from steps.report.generate import (
    ReportPaths,
    default_report_dir,
    generate_report,
    render_report,
    report_in_step,
    write_report,
)
from steps.report.records import ReportError, RunRecord, Selection

__all__ = [
    "ReportError",
    "ReportPaths",
    "RunRecord",
    "Selection",
    "default_report_dir",
    "generate_report",
    "render_report",
    "report_in_step",
    "write_report",
]
