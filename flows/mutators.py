"""Flow mutators for both flows: ship the ``steps`` library, and add the decorators the run config asks for
(@project, @schedule, @trigger; @resources on the heavy steps, @environment with ``resources.env`` (NCCL and fabric
settings) on them, @kubernetes when enabled: shared memory for NCCL, the output volume, the gang's rendezvous port)
at deploy time."""

from collections.abc import Callable
from typing import Any

from metaflow import Config, FlowMutator

from steps.config import DEFAULT_CONFIG_PATH

#: Which ``resources`` entry (train or evaluate) each heavy step asks the scheduler for with one node.
STEP_ROLES = {"reference_outputs": "evaluate", "sft": "train", "preference": "train", "evaluate": "evaluate"}
STEP_ROLES["onpolicy_round"] = "train"  # samples, judges, trains and evaluates: the training machine
#: The @parallel steps: each of their nodes trains. With a gang, sft and preference only pass its model on.
GANG_STEPS = ("sft_nodes", "preference_nodes")
#: Steps that read or write resources.output_dir: a persistent_volume_claim is mounted on each.
OUTPUT_STEPS = {"prepare_data", "reference_outputs", "sft", "sft_nodes", "preference", "preference_nodes"}
OUTPUT_STEPS |= {"evaluate", "join", "onpolicy_round"}
NODES_LABEL = "prefflow/num-nodes"


def run_config_option(parser: Callable[[str], Any], help: str) -> Config:
    """``--config config FILE``, the same option on both flows: one name (the mutators and ``config_expr`` read
    it) and one default, configs/default.yaml."""
    return Config("config", default=str(DEFAULT_CONFIG_PATH), parser=parser, help=help)


def step_roles(num_nodes: int) -> dict[str, str]:
    """The steps that get a ``resources`` entry, and which (train or evaluate), for this many nodes."""
    roles = {**STEP_ROLES, **dict.fromkeys(GANG_STEPS, "train")}
    if num_nodes > 1:  # (on-policy rounds refuse gangs when the run is planned: the round step never runs)
        del roles["sft"], roles["preference"], roles["onpolicy_round"]
    return roles


def kubernetes_kwargs(resources: Any, name: str, need: Any) -> dict[str, Any]:
    """@kubernetes for one step: its resources (``need``; None: Metaflow's defaults), the image, the output
    volume on the steps that use output_dir, and the rendezvous port of the gang steps."""
    kwargs: dict[str, Any] = {}
    if need is not None:
        kwargs.update(cpu=need.cpu, memory=need.memory)
        if need.gpu:
            kwargs["gpu"] = need.gpu
    if resources.image:
        kwargs["image"] = resources.image
    if resources.persistent_volume_claim and name in OUTPUT_STEPS:
        kwargs["persistent_volume_claims"] = {resources.persistent_volume_claim: resources.output_dir}
    if name in GANG_STEPS:
        kwargs["port"] = resources.master_port  # MF_MASTER_PORT on every node of the JobSet
        # Argo sizes the JobSet at run time (num_parallel); the label says in the template, and on each pod, how big
        kwargs["labels"] = {NODES_LABEL: str(resources.num_nodes)}
    return kwargs


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
        roles = step_roles(resources.num_nodes)
        for name, step in mutable_flow.steps:
            need = getattr(resources, roles[name]) if name in roles else None
            if need is not None:
                asked = {"cpu": need.cpu, "memory": need.memory, "gpu": need.gpu}
                if need.shared_memory_mb():  # /dev/shm for NCCL (and any scheduler that reads @resources)
                    asked["shared_memory"] = need.shared_memory_mb()
                step.add_decorator("resources", deco_kwargs=asked)
            if name in roles and resources.env:  # local tasks (and their torchrun) and pods alike
                step.add_decorator("environment", deco_kwargs={"vars": resources.env_vars()})
            on_volume = bool(resources.persistent_volume_claim) and name in OUTPUT_STEPS
            if resources.kubernetes and (need is not None or on_volume or name in GANG_STEPS):
                step.add_decorator("kubernetes", deco_kwargs=kubernetes_kwargs(resources, name, need))
