"""Runs each side of a task in its own child process, the peak probe in a third, and builds the table rows.

Every child gets one environment (threads, malloc); peak RSS comes from ``wait4``; repeats alternate the sides.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import flops, hardware
from benchmarks.probe import PeakResult, ProbeSpec
from benchmarks.spec import SideResult, WorkerSpec

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

BASELINE_NAMES = {
    "dpo": "TRL DPOTrainer",
    "simpo": "TRL CPOTrainer(loss_type=simpo)",
    "orpo": "TRL ORPOTrainer",
    "cpo": "TRL CPOTrainer",
    "dpo_lora": "TRL DPOTrainer(peft_config=LoRA)",
    "sft": "TRL SFTTrainer",
    "generate": "one prompt at a time",
}

# speed-up PrefFlow aims for (None: no target set, the row is reported without a verdict)
TARGETS: dict[str, float | None] = {
    "dpo": 2.0,
    "simpo": 1.3,
    "orpo": 1.3,
    "cpo": 1.3,
    "dpo_lora": None,
    "sft": 1.3,
    "generate": 4.0,
}


class WorkerError(RuntimeError):
    """A benchmark child failed; the message holds the tail of its log."""


@dataclass
class SideRun:
    result: SideResult
    peak_rss_mb: float  # from wait4 (the child's ru_maxrss)
    wall_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


@dataclass
class Row:
    task: str
    model: str
    prefflow: SideRun
    baseline: SideRun
    peak: PeakResult | None = None  # what MFU is taken against (training tasks)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        a, b = self.prefflow.result.tokens_per_s, self.baseline.result.tokens_per_s
        return a / b if a and b else None

    def to_json(self) -> dict[str, Any]:
        pf, bl = self.prefflow.result, self.baseline.result
        row = {
            "task": self.task,
            "model": self.model,
            "prefflow_tokens_per_s": _round(pf.tokens_per_s),
            "baseline_tokens_per_s": _round(bl.tokens_per_s),
            "ratio": _round(self.ratio, 3),
            "prefflow_peak_rss_mb": _round(self.prefflow.peak_rss_mb, 0),
            "baseline_peak_rss_mb": _round(self.baseline.peak_rss_mb, 0),
            "baseline": BASELINE_NAMES[self.task],
            "target_ratio": TARGETS[self.task],
            "device": pf.device,
            "threads": pf.threads,
            "params": pf.params,
            "prefflow_step_time_median_s": _round(pf.step_time_median_s, 4),
            "baseline_step_time_median_s": _round(bl.step_time_median_s, 4),
            "prefflow_train_tokens_per_s": _round(pf.train_tokens_per_s),
            "baseline_train_tokens_per_s": _round(bl.train_tokens_per_s),
            "prefflow_precompute_s": _round(pf.precompute_s, 2),
            "baseline_precompute_s": _round(bl.precompute_s, 2),
            "prefflow_first_loss": _round(pf.first_loss, 5),
            "baseline_first_loss": _round(bl.first_loss, 5),
            "measured_steps": len(pf.step_times_s),
            "prefflow_tokens": sum(pf.step_tokens),
            "baseline_tokens": sum(bl.step_tokens),
            "baseline_settings": bl.settings,
            "prefflow_settings": pf.settings,
            "load_avg_1m": [
                self.prefflow.load_before[0],
                self.prefflow.load_after[0],
                self.baseline.load_before[0],
                self.baseline.load_after[0],
            ],
            **self.extra,
        }
        if pf.cuda_peak_mb is not None or bl.cuda_peak_mb is not None:
            row.update(
                prefflow_cuda_peak_mb=_round(pf.cuda_peak_mb, 0), baseline_cuda_peak_mb=_round(bl.cuda_peak_mb, 0)
            )
        if self.task != "generate":
            peak = self.peak.peak_flops if self.peak else None
            row.update(
                peak_flops_per_s=_round(peak, 0),
                peak_source=self.peak.source if self.peak else None,
                peak_device=self.peak.device if self.peak else None,
                prefflow_flops_per_s=_round(pf.flops_per_s, 0),
                baseline_flops_per_s=_round(bl.flops_per_s, 0),
                prefflow_mfu=_round(flops.mfu(pf.flops_per_s, peak), 4),
                baseline_mfu=_round(flops.mfu(bl.flops_per_s, peak), 4),
                prefflow_train_flops=pf.train_flops,
                baseline_train_flops=bl.train_flops,
                prefflow_reference_flops=pf.reference_flops,
                baseline_reference_flops=bl.reference_flops,
                prefflow_flops_shapes=pf.flops_detail,
                baseline_flops_shapes=bl.flops_detail,
            )
        if self.task == "generate":
            row.update(
                prefflow_prompts_per_s=_round(pf.prompts_per_s, 3),
                baseline_prompts_per_s=_round(bl.prompts_per_s, 3),
                prompts_ratio=_round(pf.prompts_per_s / bl.prompts_per_s, 3)
                if pf.prompts_per_s and bl.prompts_per_s
                else None,
                outputs_identical=pf.outputs == bl.outputs,
                prompts=pf.prompts,
                max_new_tokens=pf.settings.get("max_new_tokens"),
                prefflow_batch_size=pf.settings.get("batch_size"),
            )
        return row


def _round(value: float | None, digits: int = 1) -> float | int | None:
    if value is None:
        return None
    return round(float(value), digits) if digits else round(float(value))


def run_child(
    module: str, payload: str, out: Path, env: dict[str, str], log_path: Path, timeout_s: float, what: str
) -> tuple[dict[str, Any], float, float]:
    """``python -m module payload`` from the repo root; wait with ``wait4``: (result JSON, peak RSS MiB, wall s)."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, payload],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
        )
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise WorkerError(f"{what} ran over {timeout_s:.0f}s; log: {log_path}")
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise WorkerError(f"{what} failed with exit code {proc.returncode}; log {log_path}:\n{tail}")
    return json.loads(out.read_text(encoding="utf-8")), rusage.ru_maxrss / 1024.0, wall


def run_side(spec: WorkerSpec, env: dict[str, str], log_dir: Path, timeout_s: float) -> SideRun:
    """One side in its own process; its peak RSS is its own."""
    log_path = log_dir / f"{spec.task}-{spec.model}-{spec.side}-{Path(spec.out).stem}.log"
    load_before = os.getloadavg()
    data, peak_rss, wall = run_child(
        "benchmarks.worker",
        spec.to_json(),
        Path(spec.out),
        env,
        log_path,
        timeout_s,
        f"{spec.side} {spec.task} ({spec.model})",
    )
    return SideRun(SideResult.from_dict(data), peak_rss, wall, load_before, os.getloadavg())


def run_probe(spec: ProbeSpec, env: dict[str, str], log_path: Path, timeout_s: float) -> PeakResult:
    """The device peak (GEMM probe on CPU) in its own process, under the sides' environment."""
    data, _, _ = run_child("benchmarks.probe", spec.to_json(), Path(spec.out), env, log_path, timeout_s, "peak probe")
    return PeakResult(**data)


def _median_run(runs: list[SideRun]) -> SideRun:
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r.result.tokens_per_s or 0.0)
    chosen = ordered[(len(ordered) - 1) // 2]
    return replace(chosen, peak_rss_mb=max(r.peak_rss_mb for r in runs))


def run_task(
    task: str,
    model: str,
    *,
    steps: int,
    warmup_steps: int,
    batch_size: int,
    max_len: int,
    threads: int,
    malloc: str,
    repeats: int,
    log_dir: Path,
    timeout_s: float,
    baseline_options: dict[str, Any],
    gen_prompts: int,
    gen_batch_size: int,
    gen_max_new_tokens: int,
) -> Row:
    """Both sides of one task (alternating over ``repeats``), then the device peak for the row's MFU."""
    env = hardware.child_env(threads, malloc)
    runs: dict[str, list[SideRun]] = {"prefflow": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="prefflow-bench-results-") as tmp:
        for repeat in range(repeats):
            order = ("prefflow", "baseline") if repeat % 2 == 0 else ("baseline", "prefflow")
            for side in order:
                spec = WorkerSpec(
                    side=side,
                    task=task,
                    model=model,
                    steps=steps,
                    warmup_steps=warmup_steps,
                    batch_size=batch_size,
                    max_len=max_len,
                    threads=threads,
                    out=str(Path(tmp) / f"{side}-{repeat}.json"),
                    gen_prompts=gen_prompts,
                    gen_batch_size=gen_batch_size,
                    gen_max_new_tokens=gen_max_new_tokens,
                    options=baseline_options if side == "baseline" else {},
                )
                logger.info("running %s %s on %s (repeat %d/%d)", side, task, model, repeat + 1, repeats)
                run = run_side(spec, env, log_dir, timeout_s)
                runs[side].append(run)
                logger.info(
                    "%s %s %s: %.1f tokens/s, peak RSS %.0f MiB, %.0fs wall, load %.2f",
                    side,
                    task,
                    model,
                    run.result.tokens_per_s or 0.0,
                    run.peak_rss_mb,
                    run.wall_s,
                    run.load_after[0],
                )
        row = Row(task, model, _median_run(runs["prefflow"]), _median_run(runs["baseline"]))
        if task != "generate":
            probe = ProbeSpec(
                gemm_shapes=row.prefflow.result.gemm_shapes,
                rows=batch_size * max_len,
                threads=threads,
                out=str(Path(tmp) / "peak.json"),
            )
            row.peak = run_probe(probe, env, log_dir / f"{task}-{model}-peak.log", timeout_s)
            logger.info("%s %s: peak %.1f GFLOP/s (%s)", task, model, (row.peak.peak_flops or 0) / 1e9, row.peak.source)
    if repeats > 1:
        row.extra["repeats"] = repeats
        row.extra["prefflow_tokens_per_s_runs"] = [_round(r.result.tokens_per_s) for r in runs["prefflow"]]
        row.extra["baseline_tokens_per_s_runs"] = [_round(r.result.tokens_per_s) for r in runs["baseline"]]
    row.extra["malloc"] = malloc
    return row


def format_table(rows: list[Row]) -> str:
    """Markdown table: one line per (task, model); on GPU the CUDA allocator peaks too."""
    gpu = any(not r.prefflow.result.device.startswith("CPU") for r in rows)
    head = [
        "task",
        "model",
        "PrefFlow tok/s",
        "baseline tok/s",
        "ratio",
        "target",
        "PrefFlow peak RSS (MiB)",
        "baseline peak RSS (MiB)",
    ]
    if gpu:
        head += ["PrefFlow CUDA peak (MiB)", "baseline CUDA peak (MiB)"]
    head += ["PrefFlow GFLOP/s", "baseline GFLOP/s", "PrefFlow MFU", "baseline MFU", "baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        j = r.to_json()
        ratio, target = j["ratio"], TARGETS[r.task]
        verdict = "" if ratio is None or target is None else (" ✓" if ratio >= target else " ✗")
        cells = [
            r.task,
            r.model,
            _fmt(j["prefflow_tokens_per_s"]),
            _fmt(j["baseline_tokens_per_s"]),
            (f"{ratio:.2f}x" if ratio is not None else "-") + verdict,
            f">= {target:g}x" if target is not None else "-",
            _fmt(j["prefflow_peak_rss_mb"], 0),
            _fmt(j["baseline_peak_rss_mb"], 0),
        ]
        if gpu:
            cells += [_fmt(j.get("prefflow_cuda_peak_mb"), 0), _fmt(j.get("baseline_cuda_peak_mb"), 0)]
        cells += [
            _fmt(_giga(j.get("prefflow_flops_per_s"))),
            _fmt(_giga(j.get("baseline_flops_per_s"))),
            _pct(j.get("prefflow_mfu")),
            _pct(j.get("baseline_mfu")),
            j["baseline"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_notes(rows: list[Row]) -> str:
    """Per-row details that do not fit the table: precompute, train-only throughput, peak, generation, load."""
    notes = []
    for r in rows:
        j = r.to_json()
        if r.task == "generate":
            notes.append(
                f"- generate/{r.model}: {j['prompts']} prompts, greedy, max {j['max_new_tokens']} new "
                f"tokens; prompts/s {j['prefflow_prompts_per_s']} (batch {j['prefflow_batch_size']}) vs "
                f"{j['baseline_prompts_per_s']} (batch 1) = {j['prompts_ratio']}x; "
                f"identical outputs: {j['outputs_identical']}"
            )
            continue
        text = (
            f"- {r.task}/{r.model}: {j['measured_steps']} measured steps; median step "
            f"{_fmt(j['prefflow_step_time_median_s'], 3)}s vs {_fmt(j['baseline_step_time_median_s'], 3)}s; "
            f"train-only tok/s {j['prefflow_train_tokens_per_s']} vs {j['baseline_train_tokens_per_s']}"
        )
        if j["prefflow_precompute_s"] is not None or j["baseline_precompute_s"] is not None:
            text += (
                f"; reference precompute {j['prefflow_precompute_s']}s vs {j['baseline_precompute_s']}s "
                "(charged per token in tok/s and FLOP/s)"
            )
        text += f"; first-step loss {j['prefflow_first_loss']} vs {j['baseline_first_loss']}" + (
            " (both log 2: each model is its own reference)"
            if r.task.startswith("dpo")
            else " (different first batches: PrefFlow buckets by length, TRL samples at random)"
        )
        if r.peak is not None:
            text += (
                f"; MFU against {_fmt(_giga(r.peak.peak_flops))} GFLOP/s ({r.peak.source}"
                + (f", {r.peak.seconds:.1f}s" if r.peak.source.endswith("probe") else "")
                + ")"
            )
        notes.append(text)
    loads = [x for r in rows for x in r.to_json()["load_avg_1m"]]
    if loads:
        notes.append(
            f"- 1-minute load average during the runs: {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs"
        )
    notes.append(
        "- FLOP/s are model FLOPs (benchmarks.flops): 6N per trained token (N = nn.Linear weights, lm_head "
        "in, embedding out; 4N + 2N_trainable with LoRA), 2N per reference-forward token, plus causal "
        "attention 2 L d_attn T (T + 1) per sequence forward, the same count for both sides; work an "
        "implementation skips (PrefFlow: a prompt shared by chosen and rejected, the vocabulary projection "
        "at scored positions only) still counts, so MFU can exceed what the hardware did"
    )
    return "\n".join(notes)


def _giga(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
