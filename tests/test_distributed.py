"""Two gloo processes take the same optimizer steps as one process with the same global batch."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_train import TOPICS_TRAIN, pair_rows, pairs_from_rows


def _run(rank: int, world_size: int, init_file: str, out_path: str, grad_accum: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    from steps.config import PreferenceConfig
    from steps.losses import get_loss
    from steps.models import load_model, load_tokenizer
    from steps.train.loop import train
    from steps.train.objectives import PreferenceObjective, precompute_reference

    tok = load_tokenizer("tiny")
    pairs = pairs_from_rows(tok, pair_rows(TOPICS_TRAIN))
    # small token budget -> 8 micro-batches per epoch; grad_accum 2 -> 4 optimizer steps
    cfg = PreferenceConfig(lr=2e-3, max_num_tokens=200, epochs=1, grad_accum=2, seed=3, dev_every_epoch=False)
    model = load_model("tiny", seed=4)
    precompute_reference(model, pairs, tok.pad_token_id, cfg)
    obj = PreferenceObjective(pairs, [], tok.pad_token_id, cfg, get_loss("dpo", beta=0.1), True)
    result = train(model, tok, obj, cfg, os.path.join(os.path.dirname(out_path), f"run{world_size}"), resume=False)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump([{"loss": h["loss"], "reward_accuracy": h["reward_accuracy"], "tokens": h["tokens"]}
                       for h in result.history], fh)
    if world_size > 1:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path, tokenizer):
    single = tmp_path / "single.json"
    _run(0, 1, "", str(single), grad_accum=2)
    double = tmp_path / "double.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(r, 2, str(tmp_path / "init"), str(double), 2)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert len(one) == len(two) >= 3
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["reward_accuracy"] == pytest.approx(b["reward_accuracy"], abs=1e-6)
