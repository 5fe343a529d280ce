"""PrefFlowReport: regenerate the results report each time PrefFlow finishes (production).

    python flows/report.py run                                   # by hand: every successful PrefFlow run
    python flows/report.py run --latest 5
    python flows/report.py --config config configs/x.yaml argo-workflows create   # deployed beside PrefFlow

Deployed with the same config (hence the same ``@project``) as PrefFlow, ``@trigger_on_finish`` starts
it after every successful PrefFlow run of the same project branch, and the report only reads runs of
that branch. The report's files are written under ``--out-dir`` (default ``$PREFFLOW_REPORT_DIR`` or
the repository's ``reports/``); on a remote worker they live as long as the pod, so the card
(table, LC WR / WR bars, the triggering run's training curves) is the durable copy.
"""
from pathlib import Path

from metaflow import (Config, FlowMutator, FlowSpec, Parameter, card, config_expr, current, project, step,
                      trigger_on_finish)

from steps.report.deployment import parse_deployment_text

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
PIPELINE_FLOW = "PrefFlow"


class package_steps_library(FlowMutator):
    """Put the ``steps`` package into the code package: Metaflow ships only the flow's own directory."""

    def add_to_package(self):
        from metaflow.packaging_sys import ContentType

        from steps.packaging import library_files

        for path, arcname in library_files():
            yield path, arcname, ContentType.CODE_CONTENT


@package_steps_library
@trigger_on_finish(flow=PIPELINE_FLOW)
@project(name=config_expr("config.deployment.project"))
class PrefFlowReport(FlowSpec):
    """Results table and plots from Metaflow's records of PrefFlow."""

    config = Config("config", default=DEFAULT_CONFIG, parser=parse_deployment_text,
                    help="the run config PrefFlow was deployed with (only its deployment section is read)")
    latest = Parameter("latest", type=int, default=0, help="only the newest N successful runs (0: all)")
    out_dir = Parameter("out_dir", type=str, default="",
                        help="report directory (default: $PREFFLOW_REPORT_DIR or the repository's reports/)")

    @card(type="blank", id="report")
    @step
    def start(self):
        """Regenerate the report; the run that triggered this one is always included."""
        from steps.report import report_card, report_for_current_run

        trigger = current.get("trigger")
        triggering = trigger.run.pathspec if trigger is not None and trigger.run is not None else None
        paths = report_for_current_run(flow_name=PIPELINE_FLOW, out_dir=self.out_dir or None,
                                       include_runs=[triggering] if triggering else None,
                                       latest=self.latest or None)
        current.card.extend(report_card(paths, triggering or (paths.runs[-1] if paths.runs else None)))
        self.report_files = paths.to_dict()
        self.next(self.end)

    @step
    def end(self):
        """Say where the report is."""
        print(f"{len(self.report_files['runs'])} runs, {self.report_files['n_rows']} models -> "
              f"{self.report_files['results_md']}")


if __name__ == "__main__":
    PrefFlowReport()
