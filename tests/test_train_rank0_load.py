"""Loading under a process group: only rank 0 reads the model; every rank builds it on the meta device, spreads it
and receives the weights, bit for bit what a plain ``load_model`` gives, tied embeddings still tied. On 2 gloo
ranks with the 135M default model and FSDP2, rank 1's host memory over the load grows by its own half of the weights
(which a GPU would hold instead) plus less than half the model's size."""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
DEFAULT = "embedded:smollm2-135m-instruct"


def _load_and_compare(rank: int, init_file: str, out_dir: str, spec: str, parallelism: str) -> None:
    """One rank: the training load (recipes.load_for_training + parallel.prepare), then a plain load_model to
    compare against, parameter by parameter and buffer by buffer (gathered from the shards)."""
    import torch.distributed as dist

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    logging.basicConfig(level=logging.INFO)
    from steps.config import config_from_dict
    from steps.config.training import LoraConfig
    from steps.models import load_model
    from steps.train import parallel
    from steps.train.recipes import load_for_training, read_model, run_precision

    record: dict = {}
    try:
        cfg = config_from_dict({"model": {"base": spec, "dtype": "float32"}})
        device = torch.device("cpu")
        precision = run_precision(cfg, device)
        lm, pending = load_for_training(spec, cfg, device, precision)
        record["meta_before_prepare"] = all(p.is_meta for p in lm.parameters())
        root = parallel.prepare(lm, parallelism, precision, pending)
        record["memory"] = parallel.last_load_memory()["policy"]
        plain = load_model(spec)  # after the measurement: the reference copy
        want = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}  # rotary tables are not saved
        bare = parallel.root_of(root)  # DDP's module, or the FSDP2 root itself: keys lm.<Hugging Face key>
        got = {name[len(parallel.ROOT_PREFIX) :]: t for name, t in bare.named_parameters()}
        got.update({name[len(parallel.ROOT_PREFIX) :]: t for name, t in bare.named_buffers()})
        mismatched = []
        for name, tensor in got.items():
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if not (full.dtype == want[name].dtype and torch.equal(full.detach(), want[name].detach())):
                mismatched.append(name)
        record["mismatched"] = mismatched
        record["compared"] = sorted(got)
        record["buffers"] = sorted(n for n, _ in plain.named_buffers())
        record["tied"] = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        record["plain_tied"] = plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
        record["model_mib"] = sum(t.numel() * t.element_size() for t in plain.parameters()) / 2**20
        if parallelism == "ddp":  # LoRA keeps loading on every rank, and says so
            lora_lm, lora_pending = read_model(spec, cfg, device, precision, LoraConfig(enabled=True))
            record["lora_pending"] = lora_pending is not None
            record["lora_meta"] = any(p.is_meta for p in lora_lm.parameters())
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        dist.destroy_process_group()


def _spawn(tmp_path: Path, spec: str, parallelism: str) -> list[dict]:
    out = tmp_path / parallelism
    out.mkdir()
    ctx = mp.get_context("spawn")
    args = (str(tmp_path / f"init-{parallelism}"), str(out), spec, parallelism)
    procs = [ctx.Process(target=_load_and_compare, args=(r, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WORLD
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_fsdp_ranks_get_rank0s_weights_exactly_and_rank1_holds_about_its_shard(tmp_path):
    ranks = _spawn(tmp_path, DEFAULT, "fsdp")
    for rank, record in enumerate(ranks):
        assert record["meta_before_prepare"], rank
        assert record["mismatched"] == [], (rank, record["mismatched"][:5])
        assert "model.rotary_emb.inv_freq" in record["compared"]  # buffers compared too (lm_head is the tied embedding)
        assert record["tied"] and record["plain_tied"]
    memory = {m["rank"]: m for m in ranks[1]["memory"]}
    assert memory == {m["rank"]: m for m in ranks[0]["memory"]}  # every rank sees every rank's record
    rank1, model_mib = memory[1], ranks[1]["model_mib"]  # 134.5M fp32 parameters: 513 MiB
    assert rank1["peak_is_the_loads"]
    # its half of the weights stays in host memory here (the device is the CPU); on a GPU it would not
    assert rank1["own_weights_in_host_mib"] == pytest.approx(model_mib / WORLD, rel=0.01)
    # everything else the load cost rank 1 (building, receiving one tensor at a time): under half the model
    # (measured: 155 MiB; every rank reading the model itself, as before: 379 MiB)
    assert rank1["transient_mib"] < model_mib / 2, rank1
    assert rank1["peak_growth_mib"] < model_mib, rank1  # less than one copy of the model in all
    assert memory[0]["peak_growth_mib"] > model_mib  # rank 0 is the one that read it


def test_ddp_ranks_get_rank0s_weights_exactly_with_ties_and_buffers_and_lora_loads_everywhere(tmp_path):
    """From a model directory, as the DPO step loads the SFT step's export."""
    from steps.models import load_model
    from steps.train.checkpoints import save_model_dir

    export = save_model_dir(load_model("tiny", seed=3), None, tmp_path / "sft-final")
    for rank, record in enumerate(_spawn(tmp_path, str(export), "ddp")):
        assert record["meta_before_prepare"], rank
        assert record["mismatched"] == [], (rank, record["mismatched"][:5])
        assert record["tied"] and record["plain_tied"], rank  # to_empty unties; the load ties again
        assert "model.rotary_emb.inv_freq" in record["buffers"], record["buffers"]
        assert not record["lora_pending"] and not record["lora_meta"]
        assert record["memory"][rank]["own_weights_in_host_mib"] == pytest.approx(record["model_mib"], rel=0.01)


def test_without_a_process_group_the_model_is_loaded_as_before(tmp_path):
    from steps.config import config_from_dict
    from steps.models import load_model
    from steps.train import parallel
    from steps.train.recipes import load_for_training, run_precision

    cfg = config_from_dict({"model": {"base": "tiny", "dtype": "float32"}})
    device = torch.device("cpu")
    lm, pending = load_for_training("tiny", cfg, device, run_precision(cfg, device))
    assert pending is None and not any(p.is_meta for p in lm.parameters())
    root = parallel.prepare(lm, "fsdp", run_precision(cfg, device))
    assert isinstance(root, parallel.LogProbModel) and root.lm is lm
    plain = load_model("tiny").state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in lm.state_dict().items())
