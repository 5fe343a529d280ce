"""The GPU check's dry run: ``python -m benchmarks.gpu_check --device cpu`` runs every section of the script
`make gpu-check` runs on a GPU (tiny models, gloo instead of NCCL) and prints one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check") / "check.json"
    proc = _gpu_check("--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert json.loads(out.read_text()) == report
    return report


def test_dry_run_passes_every_section(dry_run):
    assert dry_run["ok"] and dry_run["failed"] == []
    for section in ("mixed_precision", "process_group", "bench", "generation"):
        assert dry_run[section]["ok"], dry_run[section].get("traceback")


def test_mixed_precision_section_compares_bf16_with_fp32(dry_run):
    mp = dry_run["mixed_precision"]
    bf16, fp32 = mp["runs"]["bfloat16"], mp["runs"]["float32"]
    assert bf16["precision"] == "bfloat16 compute, float32 master weights (cpu)"
    assert fp32["precision"] == "float32 (cpu)"
    assert bf16["moved_fraction"] >= 0.5 and mp["weights_moved"]
    assert mp["auto_dtype"] == "float32" and mp["auto_dtype_ok"]
    assert mp["first_step_is_log2"] and mp["losses_match"] and 0 <= mp["bf16_tie_fraction"] < 0.01  # random init
    diffs = [abs(a - b) for a, b in zip(bf16["losses"], fp32["losses"])]
    assert len(diffs) == mp["steps"] == 3
    assert max(diffs) == pytest.approx(mp["max_abs_loss_diff"]) and max(diffs) <= mp["loss_tolerance"]


def test_process_group_section_resumes_a_ddp_checkpoint_under_fsdp(dry_run):
    pg = dry_run["process_group"]
    assert pg["backend"] == "gloo" and pg["passed"]
    assert pg["runs"]["ddp"]["steps"] == 1 and pg["runs"]["ddp"]["resumed_from"] is None
    assert pg["runs"]["fsdp"]["steps"] == 2 and pg["runs"]["fsdp"]["resumed_from"].endswith("step_0000001")
    assert {r["world_size"] for r in pg["runs"].values()} == {1}
    # DDP under autocast, then FSDP2 through its MixedPrecisionPolicy: both bf16 compute on fp32 weights
    assert {r["precision"] for r in pg["runs"].values()} == {"bfloat16 compute, float32 master weights (cpu)"}


def test_bench_and_generation_sections_report_rates(dry_run):
    for task in ("sft", "dpo"):
        row = dry_run["bench"]["rows"][task]
        assert row["tokens_per_s"] > 0 and row["model_tflops_per_s"] > 0
        assert row["mfu"] is None  # no data-sheet peak for a CPU
    gen = dry_run["generation"]
    assert gen["hf"]["tokens_per_s"] > 0 and gen["hf"]["prompts"] == 4
    assert gen["vllm"] == {"skipped": "needs a CUDA GPU"}


def test_asking_for_a_gpu_without_one_fails_clearly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _gpu_check("--device", "cuda")
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"ok": False, "error": "no CUDA GPU visible; use --device cpu for the dry run"}
