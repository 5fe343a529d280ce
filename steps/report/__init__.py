"""Results report generated from Metaflow's own records: tables, plots, config snapshots.

    from steps.report import generate_report
    generate_report(out_dir="reports", tags=["sweep-1"], latest=5)

or ``python -m steps.report --tag sweep-1 --latest 5``. Writes ``results.md``/``.csv``/``.json``,
``README.md`` with plots, ``plots/`` and ``configs/`` (per-model config snapshots) under ``out_dir``.
"""
from steps.report.card import report_card, report_for_current_run
from steps.report.generate import ReportPaths, default_report_dir, generate_report, render_report, write_report
from steps.report.records import ReportError, RunRecord, Selection

__all__ = ["ReportError", "ReportPaths", "RunRecord", "Selection", "default_report_dir", "generate_report",
           "render_report", "report_card", "report_for_current_run", "write_report"]
