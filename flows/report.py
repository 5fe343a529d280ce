"""PrefFlowReport: regenerate the results report after each PrefFlow run (``@trigger_on_finish``) or by hand:
``python flows/report.py run [--latest 5]``. Deployed with PrefFlow's config (same ``@project``), it reads only
that project branch's runs; on a remote worker the card is the durable copy of the report."""

from metaflow import FlowSpec, Parameter, card, config_expr, current, project, step, trigger_on_finish
from mutators import package_steps_library, run_config_option

from steps.config import parse_deployment_text

PIPELINE_FLOW = "PrefFlow"


@package_steps_library
@trigger_on_finish(flow=PIPELINE_FLOW)
@project(name=config_expr("config.deployment.project"))
class PrefFlowReport(FlowSpec):
    """Results table and plots from Metaflow's records of PrefFlow."""

    config = run_config_option(
        parse_deployment_text, "the run config PrefFlow was deployed with (only its deployment section is read)"
    )
    latest = Parameter("latest", type=int, default=0, help="only the newest N successful runs (0: all)")
    out_dir = Parameter(
        "out_dir",
        type=str,
        default="",
        help="report directory (default: $PREFFLOW_REPORT_DIR, else ./reports where you run)",
    )

    @card(type="blank", id="report")
    @step
    def start(self):
        """Regenerate the report; the run that triggered this one is always included."""
        from steps.report import report_in_step

        trigger = current.get("trigger")
        triggering = trigger.run.pathspec if trigger is not None and trigger.run is not None else None
        self.report_files = report_in_step(PIPELINE_FLOW, self.out_dir or None, triggering, self.latest or None)
        self.next(self.end)

    @step
    def end(self):
        """Say where the report is."""
        print(
            f"{len(self.report_files['runs'])} runs, {self.report_files['n_rows']} models -> "
            f"{self.report_files['results_md']}"
        )


if __name__ == "__main__":
    from steps.config import ensure_user_name

    ensure_user_name()
    PrefFlowReport()
