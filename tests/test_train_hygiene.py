"""CUDA hygiene reached from the CPU: the torch floor and the APIs behind it, NCCL bound to the rank's GPU, the
allocator settings the ranks get, TF32 only on CUDA, one host read of the metrics per optimizer step whatever the
micro-batch count, and collation on a background thread (order, bound, errors)."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from steps.train import launch
from steps.train.prefetch import CollationError, StepPrefetcher

REPO = Path(__file__).resolve().parents[1]


# --- the torch floor ---------------------------------------------------------------------------------------------


def test_pyproject_torch_floor_is_the_one_the_code_states_and_this_torch_has_every_api():
    from steps.train.torch_floor import TORCH_APIS, TORCH_FLOOR, missing_torch_apis

    found = re.findall(r'"torch>=([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert found == [TORCH_FLOOR]
    assert missing_torch_apis() == []
    # every API names a release no newer than the floor, and the floor is the newest of them
    since = [tuple(int(x) for x in a.since.split(".")) for a in TORCH_APIS]
    assert max(since) == tuple(int(x) for x in TORCH_FLOOR.split("."))
    assert re.search(r'torch==2\.13\.0"', (REPO / "Makefile").read_text())  # the install pin stays as it is


def test_a_missing_api_is_named_with_its_release(monkeypatch):
    from steps.train import torch_floor

    api = torch_floor.TorchApi("torch.distributed.fsdp", "FSDPModule.no_such_method", "nothing", "9.9")
    monkeypatch.setattr(torch_floor, "TORCH_APIS", (*torch_floor.TORCH_APIS, api))
    with pytest.raises(RuntimeError, match=r"FSDPModule\.no_such_method \(nothing; torch >= 9\.9\).*torch>=2\.8"):
        torch_floor.check_torch()


# --- process group and allocator --------------------------------------------------------------------------------


def test_nccl_is_bound_to_the_ranks_gpu_and_gloo_is_unchanged():
    assert launch.process_group_options(True, 3) == ("nccl", {"device_id": torch.device("cuda", 3)})
    assert launch.process_group_options(False, 3) == ("gloo", {})


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}),
    ],
)
def test_allocator_settings_default_without_overriding_the_users(given, expected):
    env = dict(given)
    assert launch.allocator_env(env) == (given == {})
    assert env == expected


def test_the_ranks_torchrun_starts_get_the_allocator_settings(tmp_path, monkeypatch):
    """launch_torchrun's real command and environment, captured where they would start torchrun."""
    from steps.config import config_from_dict, for_loss
    from steps.io import write_json
    from steps.results import TrainResult

    seen = {}
    cfg = for_loss(config_from_dict({"model": {"base": "tiny"}}), "dpo")
    rank0 = TrainResult("dpo", "out/final", "tiny", "base: tiny", "tiny", cfg.preference, 0, 0.0, 0.0, {}, {}, {}, "m")

    def fake_run_node(cmd, env, *args, **kwargs):  # what rank 0 writes (steps.train.launch.main)
        seen.update(cmd=cmd, env=env)
        write_json(tmp_path / "out" / launch.SUMMARY_FILE, rank0.to_dict())

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(launch, "run_node", fake_run_node)
    assert launch.launch_torchrun(cfg, "dpo", str(tmp_path), str(tmp_path / "out"), None, 2) == rank0
    assert seen["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "--nproc_per_node=2" in seen["cmd"]


def test_tf32_only_for_a_cuda_device():
    from steps.train.precision import enable_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert enable_tf32(torch.device("cpu")) is False
        assert torch.get_float32_matmul_precision() == "highest"
        assert enable_tf32(torch.device("cuda", 0)) is True  # a flag: settable without a GPU
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# --- one host read per step -------------------------------------------------------------------------------------


class HostReads:
    """Counts reads of tensor values into Python (``item``, ``tolist``, ``float()``, ``bool()``: each a device sync on
    a GPU) made by PrefFlow's own code (``steps/``); ``int()`` is left out: tokens are counted on the host copies of
    the batches. Left out too: the preference loss's input check (``PreferencePairs.__post_init__``: lengths > 0),
    not the trainer's; transformers' mask helper and AdamW's host-side step counters also read, and are not ours."""

    SKIP = ("__post_init__",)

    def __init__(self, monkeypatch):
        self.where: list[str] = []
        for name in ("item", "tolist", "__float__", "__bool__"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(real))

    def _counting(self, real):
        def read(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            caller = frame.f_code.co_filename
            if f"{os.sep}steps{os.sep}" in caller and frame.f_code.co_name not in self.SKIP:
                self.where.append(f"{Path(caller).name}:{frame.f_lineno}")
            return real(tensor, *args, **kwargs)

        return read


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_an_optimizer_step_reads_the_device_the_same_few_times_for_one_or_four_micro_batches(
    tokenizer, tiny_model_factory, monkeypatch, kind
):
    from steps.config import PreferenceConfig, SFTConfig
    from steps.losses import build_loss
    from steps.train.batching import collate_pairs, collate_sft, tokenize_sft
    from steps.train.loop import make_optimizer, optimizer_step
    from steps.train.objectives import PreferenceObjective, SFTObjective
    from tests.test_train import TOPICS_TRAIN, pair_rows, pairs_from_rows, sft_rows

    if kind == "sft":
        examples, _ = tokenize_sft(sft_rows(TOPICS_TRAIN[:4]), tokenizer, 256)
        cfg = SFTConfig(lr=1e-3)
        objective = SFTObjective(examples, [], tokenizer.pad_token_id, cfg)
        micro = [collate_sft([e], tokenizer.pad_token_id) for e in examples]
    else:
        examples = pairs_from_rows(tokenizer, pair_rows(TOPICS_TRAIN[:4]))
        for i, e in enumerate(examples):
            e.reference_chosen, e.reference_rejected = -30.0 - i, -31.0 + i
        cfg = PreferenceConfig(lr=1e-3)
        objective = PreferenceObjective(examples, [], tokenizer.pad_token_id, cfg, build_loss("dpo", beta=0.1), True)
        micro = [collate_pairs([e], tokenizer.pad_token_id) for e in examples]
    reads = {}
    for n in (1, 4):
        model = tiny_model_factory(seed=11)
        optimizer = make_optimizer(model, cfg)
        counter = HostReads(monkeypatch)
        stats = optimizer_step(model, optimizer, objective, micro[:n], max_grad_norm=1.0, step=0)
        reads[n] = counter.where
        monkeypatch.undo()
        assert stats["loss"] > 0 and stats["grad_norm"] > 0
    # per step, not per micro-batch: the denominator, the metrics with every rank's non-finite flags, the gradient
    # norm; the old loop also read each micro-batch's finiteness, loss and metrics (3 + 3 per micro-batch)
    assert len(reads[1]) == 3 and reads[4] == reads[1], reads


# --- collation ahead --------------------------------------------------------------------------------------------


def test_prefetcher_hands_steps_out_in_order_and_runs_at_most_depth_ahead():
    made: list[int] = []

    def make(i: int) -> list[int]:
        made.append(i)
        return [i, i * 10]

    with StepPrefetcher(make, 6, depth=2) as ahead:
        deadline = time.monotonic() + 10
        while len(made) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert made == [0, 1, 2]  # two queued, one made and waiting for room: never further ahead
        assert [ahead.get() for _ in range(6)] == [[i, i * 10] for i in range(6)]
        with pytest.raises(IndexError):
            ahead.get()


def test_a_collation_error_reaches_the_step_it_belongs_to_and_the_thread_ends():
    def make(i: int) -> list[int]:
        if i == 2:
            raise ValueError("row 7 has no tokens")
        return [i]

    ahead = StepPrefetcher(make, 5, depth=1)
    with ahead:
        assert ahead.get() == [0] and ahead.get() == [1]
        with pytest.raises(CollationError, match=r"step 3 failed: row 7 has no tokens"):
            ahead.get()
    assert not ahead._thread.is_alive()


def test_leaving_early_stops_the_thread_and_a_stuck_one_is_an_error():
    with StepPrefetcher(lambda i: [i], 1000, depth=1) as ahead:
        assert ahead.get() == [0]
    assert not ahead._thread.is_alive()  # stopped although 999 steps were never taken
    release = threading.Event()
    stuck = StepPrefetcher(lambda i: [release.wait(5)], 1, wait_s=0.2)
    with stuck, pytest.raises(CollationError, match=r"no micro-batches for step 1 of 1 after 0 s"):
        stuck.get()
    release.set()


def test_training_raises_the_collation_error_of_its_step(tokenizer, tiny_model_factory, tmp_path):
    from steps.config import SFTConfig
    from steps.train.batching import tokenize_sft
    from steps.train.loop import train
    from steps.train.objectives import SFTObjective
    from tests.test_train import TOPICS_TRAIN, sft_rows

    class Broken(SFTObjective):
        def collate_train(self, indices):
            if 3 in indices:
                raise ValueError("example 3 cannot be collated")
            return super().collate_train(indices)

    examples, _ = tokenize_sft(sft_rows(TOPICS_TRAIN[:6]), tokenizer, 256)
    cfg = SFTConfig(lr=1e-3, max_num_tokens=64, max_batch_examples=1, dev_every_epoch=False, seed=2)
    objective = Broken(examples, [], tokenizer.pad_token_id, cfg)
    with pytest.raises(CollationError, match="example 3 cannot be collated"):
        train(tiny_model_factory(), objective, cfg, tmp_path)
    assert not [t for t in threading.enumerate() if t.name == "collate-ahead"]
