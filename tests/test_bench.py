"""Smoke test of the side-by-side benchmark: it runs end to end and prints valid JSON rows (no timing checks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import BenchArgumentError, parse_args

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {"task", "model", "prefflow_tokens_per_s", "baseline_tokens_per_s", "ratio",
                 "prefflow_peak_rss_mb", "baseline_peak_rss_mb", "baseline"}


def test_bad_arguments_are_refused():
    with pytest.raises(BenchArgumentError, match="--task 'ppo'"):
        parse_args(["--task", "dpo,ppo"])
    with pytest.raises(BenchArgumentError, match="--model 'huge'"):
        parse_args(["--model", "huge"])
    with pytest.raises(BenchArgumentError, match="--steps must be >= 1"):
        parse_args(["--steps", "0"])
    args = parse_args(["--task", "dpo,generate", "--baseline-option", "precompute_ref=false"])
    assert args.tasks == ["dpo", "generate"] and args.baseline_options == {"precompute_ref": False}


def test_tiny_dpo_and_generation_print_json_rows(tmp_path):
    pytest.importorskip("trl", reason="the TRL baseline needs the 'bench' extra")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "USERNAME": os.environ.get("USERNAME", "prefflow")}
    cmd = [sys.executable, "-m", "benchmarks", "--model", "tiny", "--task", "dpo,generate", "--steps", "2",
           "--warmup-steps", "0", "--gen-prompts", "2", "--gen-batch-size", "2", "--gen-max-new-tokens", "3",
           "--log-dir", str(tmp_path), "--json"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    rows = json.loads(lines[-1])
    assert [r["task"] for r in rows] == ["dpo", "generate"]
    for row in rows:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
        assert row["model"] == "tiny"
        assert row["prefflow_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
        assert row["prefflow_peak_rss_mb"] > 0 and row["baseline_peak_rss_mb"] > 0
    dpo, gen = rows
    assert dpo["baseline"] == "TRL DPOTrainer" and dpo["measured_steps"] == 2
    # both sides start from the same model, which is its own reference: DPO's first loss is log 2
    assert dpo["prefflow_first_loss"] == pytest.approx(0.693147, abs=1e-3)
    assert dpo["baseline_first_loss"] == pytest.approx(0.693147, abs=1e-3)
    assert gen["baseline"] == "one prompt at a time" and gen["prompts"] == 2
    assert "| dpo | tiny |" in proc.stdout  # the markdown table
