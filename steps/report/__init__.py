"""Results report from Metaflow's own records: tables, plots, config snapshots (``python -m steps.report``).

``generate_report(tags=[...], latest=5)`` writes results.md/.csv/.json, README.md, plots/ and configs/."""

from steps.report.card import report_card, report_for_current_run
from steps.report.generate import ReportPaths, default_report_dir, generate_report, render_report, write_report
from steps.report.records import ReportError, RunRecord, Selection

__all__ = [
    "ReportError",
    "ReportPaths",
    "RunRecord",
    "Selection",
    "default_report_dir",
    "generate_report",
    "render_report",
    "report_card",
    "report_for_current_run",
    "write_report",
]
