"""The benchmark: FLOP counts against hand counts and torch's FLOP counter, MFU arithmetic, the probe, a tiny run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import flops
from benchmarks.cli import BenchArgumentError, parse_args
from benchmarks.probe import ProbeSpec, device_peak, gemm_probe
from benchmarks.spec import SideResult

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {
    "task",
    "model",
    "prefflow_tokens_per_s",
    "baseline_tokens_per_s",
    "ratio",
    "prefflow_peak_rss_mb",
    "baseline_peak_rss_mb",
    "baseline",
}
FLOP_KEYS = {
    "peak_flops_per_s",
    "peak_source",
    "prefflow_flops_per_s",
    "baseline_flops_per_s",
    "prefflow_mfu",
    "baseline_mfu",
    "prefflow_train_flops",
    "baseline_train_flops",
}

# steps.models.TINY_CONFIG by hand: hidden 64, 2 layers, 4 query heads of 16, 2 KV heads (k/v project to 32),
# MLP 256, lm_head tied to the 49,152-token embedding
HIDDEN, LAYERS, KV_DIM, MLP = 64, 2, 32, 256
PER_LAYER = HIDDEN * HIDDEN * 2 + HIDDEN * KV_DIM * 2 + HIDDEN * MLP * 3  # q, o; k, v; gate, up, down = 61,440


@pytest.fixture(scope="module")
def tiny_eager():
    from steps.models import load_model

    return load_model("tiny", attn_implementation="eager")  # eager: attention as plain matmuls the counter sees


def test_bad_arguments_are_refused():
    with pytest.raises(BenchArgumentError, match="--task 'ppo'"):
        parse_args(["--task", "dpo,ppo"])
    with pytest.raises(BenchArgumentError, match="--model 'huge'"):
        parse_args(["--model", "huge"])
    with pytest.raises(BenchArgumentError, match="--steps must be >= 1"):
        parse_args(["--steps", "0"])
    args = parse_args(["--task", "dpo,dpo_lora,generate", "--baseline-option", "precompute_ref=false"])
    assert args.tasks == ["dpo", "dpo_lora", "generate"] and args.baseline_options == {"precompute_ref": False}


def test_model_shape_counts_every_linear_including_the_tied_lm_head(tiny_eager):
    shape = flops.model_shape(tiny_eager)
    vocab = tiny_eager.config.vocab_size
    assert vocab == 49152 and PER_LAYER == 61440
    assert shape.matmul_params == LAYERS * PER_LAYER + HIDDEN * vocab  # embedding lookup excluded
    assert shape.trainable_matmul_params == shape.matmul_params
    assert (shape.n_layers, shape.attn_dim) == (LAYERS, 64)


def test_flop_formulas_against_a_hand_count(tiny_eager):
    shape = flops.model_shape(tiny_eager)
    n = LAYERS * PER_LAYER + HIDDEN * 49152
    # sequences of 3 and 5 tokens: 8 tokens of 2N, causal attention 2 * L * d * T(T+1) per sequence
    attention = 2 * LAYERS * 64 * (3 * 4 + 5 * 6)
    assert flops.attention_flops(shape, 3) + flops.attention_flops(shape, 5) == attention == 10752
    assert flops.forward_flops(shape, [3, 5]) == 2 * n * 8 + attention
    assert flops.train_flops(shape, [3, 5]) == 6 * n * 8 + 3 * attention
    counted = flops.step_flops(shape, shape, [[3], [5]])
    assert counted["train_flops"] == 6 * n * 8 + 3 * attention
    assert counted["reference_flops"] == 2 * n * 8 + attention
    assert flops.step_flops(shape, None, [[3, 5]])["reference_flops"] == 0


@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward+backward"])
def test_full_fine_tuning_count_matches_torch_flop_counter(tiny_eager, train):
    """torch counts every matmul it runs; eager attention runs the full T x T (masked afterwards)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape, t = flops.model_shape(tiny_eager), 8
    ids = torch.randint(0, 1000, (1, t), generator=torch.Generator().manual_seed(0))
    tiny_eager.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        logits = tiny_eager(input_ids=ids).logits
        if train:
            logits.sum().backward()
    full_attention = 4 * shape.n_layers * shape.attn_dim * t * t  # what eager computes, vs our causal half
    passes = 3 if train else 1
    ours = (flops.train_flops if train else flops.forward_flops)(shape, [t])
    assert counter.get_total_flops() == ours - passes * flops.attention_flops(shape, t) + passes * full_attention


def test_lora_count_by_hand_and_against_torch_flop_counter():
    import peft
    from torch.utils.flop_counter import FlopCounterMode

    from steps.models import load_model

    model = load_model("tiny", attn_implementation="eager")
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    shape = flops.model_shape(model)
    adapters = LAYERS * ((HIDDEN * 4 + 4 * HIDDEN) + (HIDDEN * 4 + 4 * KV_DIM))  # q: 64->4->64, v: 64->4->32
    base = LAYERS * PER_LAYER + HIDDEN * 49152
    assert (shape.matmul_params, shape.trainable_matmul_params) == (base + adapters, adapters) == (base + 1792, 1792)
    t = 8
    assert flops.train_flops(shape, [t]) == (4 * (base + 1792) + 2 * 1792) * t + 3 * flops.attention_flops(shape, t)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.arange(t)[None]).logits.sum().backward()
    ours_full_attention = (
        flops.train_flops(shape, [t])
        - 3 * flops.attention_flops(shape, t)
        + 3 * 4 * shape.n_layers * shape.attn_dim * t * t
    )
    # torch skips the input gradients nothing needs (layer 0's q/k/v inputs, its K): 0.14 % here, ignored by design
    assert counter.get_total_flops() < ours_full_attention
    assert counter.get_total_flops() == pytest.approx(ours_full_attention, rel=5e-3)


def test_flops_per_s_charges_the_precompute_like_tokens_per_s():
    result = SideResult(
        side="prefflow",
        task="dpo",
        model="tiny",
        implementation="x",
        device="CPU",
        threads=1,
        params=1,
        settings={},
        step_times_s=[1.0, 1.0],
        step_tokens=[100, 100],
        warmup_tokens=200,
        precompute_s=0.5,
        train_flops=10**9,
        reference_flops=2 * 10**8,
    )
    # the precompute covered 400 tokens; the 200 measured ones carry half of it: 2 s + 0.25 s
    assert result.tokens_per_s == pytest.approx(200 / 2.25)
    assert result.flops_per_s == pytest.approx(1.2e9 / 2.25)
    assert flops.mfu(result.flops_per_s, 1e9) == pytest.approx(1.2 / 2.25)
    assert flops.mfu(None, 1e9) is None and flops.mfu(1e9, None) is None
    no_reference = SideResult(
        side="baseline",
        task="simpo",
        model="tiny",
        implementation="x",
        device="CPU",
        threads=1,
        params=1,
        settings={},
        step_times_s=[0.5],
        step_tokens=[50],
        train_flops=3 * 10**8,
    )
    assert no_reference.flops_per_s == pytest.approx(6e8)


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA RTX A6000", 155.0),
        ("NVIDIA RTX 6000 Ada Generation", 364.0),
        ("Tesla V100-SXM2-16GB", None),
        ("Tesla T4", None),
    ],
)
def test_peak_table_matches_device_names(name, tflops):
    peak = flops.peak_bf16_flops(name)
    assert peak == (None if tflops is None else tflops * 1e12)


def test_gemm_probe_weights_shapes_by_count():
    shapes = [[16, 32, 3], [32, 8, 1]]
    peak, detail = gemm_probe(shapes, rows=64, repeats=2)
    assert [(d["in"], d["out"], d["count"]) for d in detail] == [(16, 32, 3), (32, 8, 1)]
    # the combined rate is total work over total time, each shape's time = its work / its own rate
    work = [6 * 64 * 16 * 32, 6 * 64 * 32 * 8]
    assert peak == pytest.approx((3 * work[0] + work[1]) / (3 * detail[0]["seconds"] + detail[1]["seconds"]))
    assert detail[1]["gflops_per_s"] == pytest.approx(work[1] / detail[1]["seconds"] / 1e9, abs=0.01)
    with pytest.raises(ValueError, match="rows >= 1"):
        gemm_probe(shapes, rows=0)


def test_cpu_peak_comes_from_the_probe(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on GPU the peak comes from the data-sheet table")
    result = device_peak(
        ProbeSpec(gemm_shapes=[[64, 64, 2]], rows=32, threads=1, out=str(tmp_path / "p.json"), repeats=1)
    )
    assert result.source == "fp32 GEMM probe" and result.device.startswith("CPU")
    assert result.peak_flops > 0 and math.isfinite(result.peak_flops)


def test_tiny_dpo_lora_and_generation_print_json_rows(tmp_path):
    pytest.importorskip("trl", reason="the TRL baseline needs the 'bench' extra")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "USERNAME": os.environ.get("USERNAME", "prefflow")}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--model",
        "tiny",
        "--task",
        "dpo,dpo_lora,generate",
        "--steps",
        "2",
        "--warmup-steps",
        "0",
        "--gen-prompts",
        "2",
        "--gen-batch-size",
        "2",
        "--gen-max-new-tokens",
        "3",
        "--log-dir",
        str(tmp_path),
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["task"] for r in rows] == ["dpo", "dpo_lora", "generate"]
    for row in rows:
        assert set(row) >= REQUIRED_KEYS, REQUIRED_KEYS - set(row)
        assert row["model"] == "tiny"
        assert row["prefflow_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
        assert row["prefflow_peak_rss_mb"] > 0 and row["baseline_peak_rss_mb"] > 0
    dpo, lora, gen = rows
    assert dpo["baseline"] == "TRL DPOTrainer" and dpo["measured_steps"] == 2
    for row in (dpo, lora):
        assert set(row) >= FLOP_KEYS, FLOP_KEYS - set(row)
        assert row["peak_source"] == "fp32 GEMM probe" and row["peak_flops_per_s"] > 0
        assert row["prefflow_mfu"] > 0 and row["baseline_mfu"] > 0
        # both sides start from the same model, which is its own reference: DPO's first loss is log 2
        assert row["prefflow_first_loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert row["baseline_first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert lora["baseline"] == "TRL DPOTrainer(peft_config=LoRA)"
    assert lora["prefflow_settings"]["lora"] == lora["baseline_settings"]["lora"] | {"via": "preference.lora (peft)"}
    # r 16 on q/k/v/o of 2 layers: q, o 64->16->64, k, v 64->16->32
    adapters = 2 * (2 * (64 * 16 + 16 * 64) + 2 * (64 * 16 + 16 * 32))
    assert lora["prefflow_settings"]["trainable_params"] == lora["baseline_settings"]["trainable_params"] == adapters
    assert lora["prefflow_flops_shapes"]["policy_shape"]["trainable_matmul_params"] == adapters
    assert gen["baseline"] == "one prompt at a time" and gen["prompts"] == 2
    assert "| dpo | tiny |" in proc.stdout and "| dpo_lora | tiny |" in proc.stdout  # the markdown table
