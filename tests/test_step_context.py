"""What a step works with (steps.step_context.StepContext) and how far a flow step is from the training loop: the
real call path, counted; and the handoff's datastore location read through Metaflow's public Client API."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from steps.train.gang import Gang

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "name": "chain",
    "data": {"input": "embedded", "max_trees": 14, "dev_fraction": 0.2},
    "model": {"base": "tiny", "dtype": "float32"},
    "sft": {"max_num_tokens": 512, "max_seq_len": 256, "overlength": "truncate", "max_steps": 1},
    "preference": {"max_num_tokens": 512, "max_seq_len": 256, "overlength": "truncate", "max_steps": 1},
    "evaluation": {"enabled": False},
}


class _ReachedTheLoop(Exception):
    pass


@pytest.mark.parametrize("variant", ["sft", "dpo"])
def test_a_training_step_reaches_the_loop_in_four_calls(variant, tmp_path, monkeypatch):
    """The flow's sft step calls pipeline.train_sft, its preference step pipeline.train_variant: from there the
    in-process path reaches loop.train through train_on_node and the recipe, every frame of steps/ counted."""
    from steps.pipeline import plan_run, prepare_data, step_context, train_sft, train_variant
    from steps.train import recipes

    stacks: list[list[str]] = []

    def loop_train(*args, **kwargs):
        frames = traceback.extract_stack()[:-1]
        stacks.append([f"{Path(f.filename).relative_to(REPO)}:{f.name}" for f in frames if _ours(f.filename)])
        raise _ReachedTheLoop

    monkeypatch.setattr(recipes, "train", loop_train)  # the recipes call steps.train.loop.train by this name
    plan, output_root = plan_run({**CONFIG, "resources": {"output_dir": str(tmp_path)}}, "dpo", "", "", "F", "1")
    data_dir, _ = prepare_data(step_context(plan.config, output_root))
    with pytest.raises(_ReachedTheLoop):
        if variant == "sft":
            train_sft(step_context(plan.config, output_root), data_dir)
        else:
            dpo = next(v for v in plan.variants if v.loss == "dpo")
            train_variant(step_context(dpo.config, output_root), dpo, data_dir, None)
    (stack,) = stacks
    entry = "train_sft" if variant == "sft" else "train_variant"
    recipe = "run_sft" if variant == "sft" else "run_preference"
    # the flow step -> these three -> loop.train: four calls
    assert stack == [
        f"steps/pipeline.py:{entry}",
        "steps/train/launch.py:train_on_node",
        f"steps/train/recipes.py:{recipe}",
    ]


def _ours(filename: str) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(REPO / top) for top in ("steps", "flows"))


def test_a_gang_of_one_node_is_one_node(tmp_path):
    from steps.config import config_from_dict
    from steps.step_context import step_context

    cfg = config_from_dict({})
    one = step_context(cfg, str(tmp_path), None, Gang(1, 0, "127.0.0.1", 29500))
    two = step_context(cfg, str(tmp_path), None, Gang(2, 1, "127.0.0.1", 29500))
    assert (one.gang, one.node_index, one.store) == (None, 0, None)  # no handoff: a shared filesystem, no store
    assert (two.gang is not None, two.node_index) == (True, 1)


DATASTORE_FLOW = """
from metaflow import FlowSpec, step

from steps.model_store import handoff_location


class HandoffFlow(FlowSpec):
    @step
    def start(self):
        self.handoff = handoff_location("datastore", "/runs/HandoffFlow/7", "HandoffFlow")
        self.private = [self._datastore.TYPE, self._datastore._storage_impl.datastore_root]  # the test's yardstick
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    HandoffFlow()
"""


def test_the_handoff_finds_the_datastore_through_public_apis(tmp_path):
    """start's handoff location is the run's own datastore (what the task's private datastore object says too)."""
    from metaflow import Runner, namespace

    flow = tmp_path / "handoff_flow.py"
    flow.write_text(DATASTORE_FLOW)
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"), "USERNAME": "prefflow", "PYTHONPATH": str(REPO)}
    with Runner(str(flow), show_output=False, env=env, cwd=str(tmp_path)).run() as running:
        assert running.status == "successful", running.stderr[-3000:]
        namespace(None)
        start = running.run["start"].task.data
    assert (
        [start.handoff["ds_type"], start.handoff["ds_root"]]
        == start.private
        == ["local", str(tmp_path / "mf" / ".metaflow")]
    )
    assert start.handoff["prefix"] == "HandoffFlow/prefflow_handoff/7"
