"""Per-rank gradient accumulation plans, NCCL-safe collective placement, the GPU step lock and checkpoint contents,
checked without a GPU: placement is a comparison of devices, and every trainer collective goes through one module."""

from __future__ import annotations

import ast
import fcntl
from pathlib import Path

import pytest
import torch

from steps.train.dealing import deal, deal_marked, plan_epoch, rank_share

TRAIN_DIR = Path(__file__).resolve().parents[1] / "steps" / "train"


def test_grad_accum_is_per_rank_eight_ranks_times_four():
    """fairseq2's gradient_accumulation: a step of 8 ranks x 4 is 32 micro-batches, 4 on each rank."""
    plan = plan_epoch(70, world_size=8, grad_accum=4, lockstep=False)
    assert plan.steps == [list(range(0, 32)), list(range(32, 64))]
    assert plan.dropped == [64, 65, 66, 67, 68, 69]  # a tail of 6 cannot give each of 8 ranks one: left out
    for rank in range(8):
        assert rank_share(plan.steps[0], rank, 8) == [rank, rank + 8, rank + 16, rank + 24]


@pytest.mark.parametrize(
    ("num_batches", "lockstep", "tail", "dropped"),
    [
        (75, False, list(range(64, 75)), []),  # 11 left: every rank gets 1 or 2 (DDP needs no equal counts)
        (75, True, list(range(64, 72)), [72, 73, 74]),  # FSDP2: every rank the same count, 1 each
        (64, True, None, []),  # no tail at all
        (66, False, None, [64, 65]),  # 2 left for 8 ranks: dropped, never a dummy forward
    ],
)
def test_epoch_tail(num_batches, lockstep, tail, dropped):
    plan = plan_epoch(num_batches, world_size=8, grad_accum=4, lockstep=lockstep)
    assert plan.dropped == dropped
    if tail is None:
        assert len(plan.steps) == 2 and all(len(s) == 32 for s in plan.steps)
    else:
        assert plan.steps[-1] == tail
        shares = [rank_share(tail, r, 8) for r in range(8)]
        assert all(shares) and sorted(i for s in shares for i in s) == tail
        if lockstep:
            assert {len(s) for s in shares} == {1}


def test_one_process_plans_like_before_and_resume_continues_from_the_offset():
    assert plan_epoch(7, 1, 3, False).steps == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_epoch(7, 1, 3, False, start=3).steps == [[3, 4, 5], [6]]
    assert plan_epoch(8, 2, 3, True, start=6).steps == [[6, 7]]


def test_dealing_work_items_with_and_without_lockstep():
    items = list("abcde")
    assert deal(items, 0, 2) == ["a", "c", "e"] and deal(items, 1, 2) == ["b", "d"]
    assert deal_marked(items, 1, 2, lockstep=True) == [("b", True), ("d", True), ("b", False)]
    assert deal_marked(["a"], 1, 2, lockstep=True) == [("a", False)]  # a rank with nothing still runs a forward


@pytest.mark.parametrize(
    ("tensor_device", "rank_device", "ok"),
    [
        ("cpu", "cuda:0", False),  # the metrics vector that NCCL rejected at the end of step 1
        ("cuda:1", "cuda:0", False),
        ("cuda:0", "cuda:0", True),
        ("cuda", "cuda:3", True),  # index unknown: the current device
        ("cpu", "cpu", True),
        ("cuda:0", "cpu", False),
    ],
)
def test_placement_is_checked_against_the_rank_device(tensor_device, rank_device, ok):
    from steps.train.collectives import placement_problem

    problem = placement_problem(torch.device(tensor_device), torch.device(rank_device))
    assert (problem is None) == ok, problem


def test_a_cpu_tensor_never_reaches_a_collective_of_a_cuda_rank():
    """The real entry point refuses before touching torch.distributed (no process group needed)."""
    from steps.train.collectives import CollectivePlacementError, all_reduce_sum

    with pytest.raises(CollectivePlacementError, match=r"step metrics: tensor on cpu but the rank computes on cuda:0"):
        all_reduce_sum(torch.zeros(3, dtype=torch.float64), "cuda:0", "step metrics")


COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "gather",
    "scatter",
    "reduce",
    "send",
    "recv",
}


@pytest.mark.parametrize("path", sorted(TRAIN_DIR.glob("*.py")), ids=lambda p: p.name)
def test_every_trainer_collective_goes_through_the_checked_module(path):
    if path.name == "collectives.py":
        return
    tree = ast.parse(path.read_text())
    direct = [
        f"{path.name}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in COLLECTIVES
        and ast.unparse(node.func.value) in ("dist", "torch.distributed")
    ]
    direct += [
        f"{path.name}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module == "torch.distributed"
        and any(a.name in COLLECTIVES for a in node.names)
    ]
    assert not direct, f"collectives outside steps/train/collectives.py (no placement check): {direct}"


@pytest.mark.parametrize(
    ("resources", "locked"),
    [({}, True), ({"kubernetes": True}, False), ({"serialize_gpu_steps": False}, False)],
)
def test_gpu_steps_of_a_local_run_take_turns(tmp_path, monkeypatch, resources, locked):
    from steps.config import config_from_dict
    from steps.step_context import cpu_heavy_section, device_lock_path

    monkeypatch.setenv("PREFFLOW_DEVICE_LOCK", str(tmp_path / "gpu.lock"))
    cfg = config_from_dict({"resources": {"output_dir": str(tmp_path / "runs"), **resources}})
    assert device_lock_path() == tmp_path / "gpu.lock"
    with cpu_heavy_section(cfg, "evaluate dpo", gpu=True):
        assert not (tmp_path / "runs" / ".cpu-heavy.lock").exists()  # GPUs are a machine's, not a run's
        if locked:
            with open(tmp_path / "gpu.lock", "a+b") as other, pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            assert not (tmp_path / "gpu.lock").exists()


def test_lora_checkpoints_hold_the_adapter_only(tokenizer, tiny_model_factory, tmp_path):
    pytest.importorskip("peft")
    from torch.distributed.checkpoint import FileSystemReader

    from steps.config import LoraConfig, SFTConfig
    from steps.train.batching import tokenize_sft
    from steps.train.loop import train
    from steps.train.objectives import SFTObjective
    from steps.train.recipes import apply_lora
    from tests.test_train import TOPICS_TRAIN, sft_rows

    examples, _ = tokenize_sft(sft_rows(TOPICS_TRAIN[:4]), tokenizer, 256)
    cfg = SFTConfig(lr=1e-3, max_num_tokens=512, max_steps=1, dev_every_epoch=False, lora=LoraConfig(enabled=True))
    train(apply_lora(tiny_model_factory(), cfg), SFTObjective(examples, [], 0, cfg), cfg, tmp_path)
    state = tmp_path / "checkpoints" / "step_0000001" / "state"
    keys = list(FileSystemReader(str(state)).read_metadata().state_dict_metadata)
    weights = [k for k in keys if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights), weights[:5]
    size = sum(p.stat().st_size for p in state.iterdir())
    assert size < 2_000_000, size  # the 3.3M-parameter base in fp32 alone would be 13 MB
