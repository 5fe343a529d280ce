"""Config-driven deployment decorators for flows/pipeline.py (a Metaflow FlowMutator).

Hard-coding ``@kubernetes`` or ``@schedule`` would break local runs or tie every deployment to one
cron; instead the run config's ``deployment`` and ``resources`` sections decide, at deploy time:

* ``@project(name=deployment.project)``: production and personal deployments don't collide;
* ``@schedule(cron=deployment.schedule_cron)`` (6-field AWS form, read by Argo and Step Functions);
* ``@trigger(event=deployment.trigger_event)``: rerun when new data lands;
* ``@kubernetes(image=resources.image, ...)`` on the heavy steps only when ``resources.kubernetes``.
"""
from metaflow import FlowMutator

HEAVY_STEPS = {"reference_outputs": "evaluate", "sft": "train", "preference": "train", "evaluate": "evaluate"}


class deployment_from_config(FlowMutator):
    def add_to_package(self):
        """Ship the ``steps`` library with the code package (Metaflow packages only the flow's directory)."""
        from metaflow.packaging_sys import ContentType

        from steps.packaging import library_files

        for path, arcname in library_files():
            yield path, arcname, ContentType.CODE_CONTENT

    def pre_mutate(self, mutable_flow):
        cfg = dict(mutable_flow.config)
        deployment = cfg.get("deployment") or {}
        resources = cfg.get("resources") or {}
        mutable_flow.add_decorator("project", deco_kwargs={"name": deployment.get("project") or "prefflow"})
        if deployment.get("schedule_cron"):
            mutable_flow.add_decorator("schedule", deco_kwargs={"cron": deployment["schedule_cron"]})
        if deployment.get("trigger_event"):
            mutable_flow.add_decorator("trigger", deco_kwargs={"event": deployment["trigger_event"]})
        if resources.get("kubernetes"):
            for name, step in mutable_flow.steps:
                if name in HEAVY_STEPS:
                    need = resources.get(HEAVY_STEPS[name]) or {}
                    kwargs = {"cpu": need.get("cpu", 2), "memory": need.get("memory", 8000)}
                    if need.get("gpu"):
                        kwargs["gpu"] = need["gpu"]
                    if resources.get("image"):
                        kwargs["image"] = resources["image"]
                    step.add_decorator("kubernetes", deco_kwargs=kwargs)
