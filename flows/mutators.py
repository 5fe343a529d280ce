"""Flow mutators for both flows: ship the ``steps`` library, and add the decorators the run config asks for
(@project, @schedule, @trigger; @resources on the heavy steps, @kubernetes when enabled) at deploy time."""

from typing import Any

from metaflow import FlowMutator

#: Which ``resources`` entry (train or evaluate) each heavy step asks the scheduler for; other steps get defaults.
STEP_ROLES = {"reference_outputs": "evaluate", "sft": "train", "preference": "train", "evaluate": "evaluate"}


def _config_mapping(mutable_flow: Any) -> dict:
    for name, value in mutable_flow.configs:
        if name == "config":
            return value.to_dict() if value is not None else {}
    return {}


class package_steps_library(FlowMutator):
    """Put every file of ``steps`` into the code package: Metaflow ships only the flow's own directory."""

    def add_to_package(self):
        from metaflow.packaging_sys import ContentType

        from steps.packaging import library_files

        for path, arcname in library_files():
            yield path, arcname, ContentType.CODE_CONTENT


class deployment_from_config(FlowMutator):
    """Decorators from the config's ``deployment`` and ``resources`` sections (hard-coded ones break local runs)."""

    def pre_mutate(self, mutable_flow):
        from steps.config import load_section

        raw = _config_mapping(mutable_flow)
        deployment, resources = load_section(raw, "deployment"), load_section(raw, "resources")
        mutable_flow.add_decorator("project", deco_kwargs={"name": deployment.project})
        if deployment.schedule_cron:
            mutable_flow.add_decorator("schedule", deco_kwargs={"cron": deployment.schedule_cron})
        if deployment.trigger_event:
            mutable_flow.add_decorator("trigger", deco_kwargs={"event": deployment.trigger_event})
        for name, step in mutable_flow.steps:
            if name not in STEP_ROLES:
                continue
            need = getattr(resources, STEP_ROLES[name])
            step.add_decorator("resources", deco_kwargs={"cpu": need.cpu, "memory": need.memory, "gpu": need.gpu})
            if resources.kubernetes:
                kwargs = {"cpu": need.cpu, "memory": need.memory}
                if need.gpu:
                    kwargs["gpu"] = need.gpu
                if resources.image:
                    kwargs["image"] = resources.image
                step.add_decorator("kubernetes", deco_kwargs=kwargs)
