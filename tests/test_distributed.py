"""Two gloo processes take the same optimizer steps as one process with the same global batch,
with replicated weights (ddp) and with FSDP2-sharded weights (fsdp), and a sharded run resumes exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.test_train import TOPICS_TRAIN, pair_rows, pairs_from_rows


def _run(
    rank: int,
    world_size: int,
    init_file: str,
    out_dir: str,
    parallelism: str = "ddp",
    stop_after_steps: int | None = None,
) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    from steps.config import PreferenceConfig
    from steps.losses import build_loss
    from steps.models import load_model, load_tokenizer
    from steps.train.loop import train
    from steps.train.objectives import PreferenceObjective, precompute_reference

    tok = load_tokenizer("tiny")
    pairs = pairs_from_rows(tok, pair_rows(TOPICS_TRAIN))
    # small token budget -> 8 micro-batches per epoch; grad_accum 3 -> 3 optimizer steps, the last one
    # with 2 micro-batches, so under fsdp with 2 ranks the first step deals 2 to one rank and 1 to the other
    cfg = PreferenceConfig(
        lr=2e-3,
        max_num_tokens=200,
        epochs=1,
        grad_accum=3,
        seed=3,
        dev_every_epoch=False,
        parallelism=parallelism,
        checkpoint_every_steps=1,
    )
    model = load_model("tiny", seed=4)
    precompute_reference(model, pairs, tok.pad_token_id, cfg)
    obj = PreferenceObjective(pairs, [], tok.pad_token_id, cfg, build_loss("dpo", beta=0.1), True)
    try:
        result = train(model, tok, obj, cfg, out_dir, resume=True, stop_after_steps=stop_after_steps)
        from torch.distributed.tensor import DTensor

        sharded = [isinstance(p, DTensor) for p in result.model.parameters()]
        assert all(sharded) if (parallelism == "fsdp" and world_size > 1) else not any(sharded)
        if rank == 0:
            Path(out_dir, "history.json").write_text(
                json.dumps(
                    [
                        {
                            "loss": h["loss"],
                            "reward_accuracy": h["reward_accuracy"],
                            "tokens": h["tokens"],
                            "grad_norm": h["grad_norm"],
                        }
                        for h in result.history
                    ]
                )
            )
    except KeyboardInterrupt:  # stop_after_steps: a simulated kill after a checkpoint
        pass
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def _spawn(tmp_path: Path, name: str, **kwargs) -> Path:
    out = tmp_path / name
    init = tmp_path / f"init-{name}-{kwargs.get('stop_after_steps')}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(r, 2, str(init), str(out)), kwargs=kwargs) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    last = sorted((out / "checkpoints").glob("step_*"))[-1]
    return load_file(last / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _run(0, 1, "", str(out))
    return out


def _assert_same_steps(a_dir: Path, b_dir: Path) -> None:
    one, two = (json.loads((d / "history.json").read_text()) for d in (a_dir, b_dir))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["reward_accuracy"] == pytest.approx(b["reward_accuracy"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = _final_weights(a_dir), _final_weights(b_dir)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=0, msg=key)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, single, parallelism):
    double = _spawn(tmp_path, parallelism, parallelism=parallelism)
    _assert_same_steps(single, double)
    _assert_same_weights(single, double)


def test_sharded_run_resumes_exactly(tmp_path, single):
    out = _spawn(tmp_path, "fsdp", parallelism="fsdp", stop_after_steps=1)
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_0000001"]
    out = _spawn(tmp_path, "fsdp", parallelism="fsdp")  # picks up the step-1 checkpoint
    _assert_same_steps(single, out)
    _assert_same_weights(single, out)


def test_torchrun_launcher_trains_a_sharded_model_like_one_process(tmp_path, tokenizer):
    """The flow's path: steps.train.launch starts torchrun; 2 FSDP2 ranks write the same final model as 1 process."""
    from steps.io import write_jsonl
    from steps.train.launch import launch

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_jsonl(data_dir / "preference.train.jsonl", pair_rows(TOPICS_TRAIN))
    raw = {
        "name": "launch_test",
        "model": {"base": "tiny", "dtype": "float32"},
        "preference": {
            "criterion": "dpo",
            "criterion_config": {"beta": 0.1},
            "lr": 2e-3,
            "max_num_tokens": 200,
            "max_seq_len": 200,
            "grad_accum": 3,
            "seed": 3,
            "dev_every_epoch": False,
            "parallelism": "fsdp",
        },
    }
    os.environ["OMP_NUM_THREADS"] = "1"
    one = launch(raw, "dpo", str(data_dir), str(tmp_path / "one"), nproc_per_node=1)
    two = launch(raw, "dpo", str(data_dir), str(tmp_path / "two"), nproc_per_node=2)
    assert one["steps"] == two["steps"] == 3
    assert two["final_train"]["loss"] == pytest.approx(one["final_train"]["loss"], abs=1e-5)
    a, b = (load_file(Path(s["model_dir"]) / "model.safetensors") for s in (one, two))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=0, msg=key)
