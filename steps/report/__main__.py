"""``python -m steps.report``: regenerate the results report from Metaflow's records."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from steps.report.generate import generate_report
from steps.report.records import ReportError, Selection


def build_parser() -> argparse.ArgumentParser:
    """Every option but ``--quiet`` is stored under the name of the ``generate_report`` keyword or ``Selection`` field
    it sets (``--flow``: ``flow_name``)."""
    p = argparse.ArgumentParser(prog="python -m steps.report", description=__doc__)
    repeatable: dict[str, Any] = {"action": "append", "default": []}
    p.add_argument("--flow", dest="flow_name", metavar="FLOW", default="PrefFlow", help="flow name (default: PrefFlow)")
    p.add_argument(
        "--out-dir",
        default=None,
        help="report directory (default: $PREFFLOW_REPORT_DIR, else ./reports of the working directory)",
    )
    p.add_argument(
        "--tag",
        dest="tags",
        metavar="TAG",
        help="only runs carrying this tag (repeat: runs carrying all of them)",
        **repeatable,
    )
    p.add_argument(
        "--namespace",
        default=None,
        help="Metaflow namespace, e.g. user:alice or production:TOKEN (default: global, all runs)",
    )
    p.add_argument("--latest", type=int, default=None, metavar="N", help="only the newest N matching runs")
    p.add_argument(
        "--include-run",
        dest="include_runs",
        metavar="FLOW/RUN_ID",
        help="also include this run even if it has not finished (repeatable)",
        **repeatable,
    )
    p.add_argument(
        "--datastore-root",
        default=None,
        metavar="DIR",
        help="directory holding the local .metaflow datastore (default: Metaflow's configuration)",
    )
    p.add_argument(
        "--filter",
        dest="row_filters",
        metavar="KEY=VALUE",
        help="only rows whose KEY has VALUE (repeat: all must hold); KEY is a row field of results.json such as "
        "loss (loss_function), judge_endpoint, judge_model, alpaca_eval_version, eval_set_sha256, eval_dtype, or "
        "FIELD.KEY into a mapping (decoding.temperature, benchmark_versions.nvidia-ifbench)",
        **repeatable,
    )
    p.add_argument(
        "--group-by",
        default=None,
        metavar="KEY",
        help="one table per value of KEY (the same keys as --filter), e.g. --group-by alpaca_eval_version",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def selection_of(options: dict[str, Any]) -> Selection:
    """The runs and rows the parsed options pick (``include_runs`` are pathspecs here)."""
    return Selection(
        flow=options["flow_name"],
        tags=tuple(options["tags"]),
        namespace=options["namespace"],
        latest=options["latest"],
        include_runs=tuple(options["include_runs"]),
        row_filters=tuple(options["row_filters"]),
        group_by=options["group_by"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = vars(build_parser().parse_args(argv))
    quiet = options.pop("quiet")
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        paths = generate_report(selection_of(options), options["out_dir"], options["datastore_root"])
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(paths.runs)} runs, {paths.n_rows} models -> {paths.results_md}, {paths.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
