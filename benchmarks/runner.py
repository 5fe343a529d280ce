"""Runs both sides of each task in separate child processes and turns their results into table rows.

Each side is a fresh ``python -m benchmarks.worker`` with the same environment (threads, malloc preset),
so one side's memory never counts against the other: the parent reads the child's peak RSS from
``wait4``. With ``repeats > 1`` the sides alternate (P, B, P, B, ...) and the median run of each side is
kept, which evens out load from other processes on a shared machine.
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
from typing import Any, Optional

from benchmarks import hardware
from benchmarks.spec import SideResult, WorkerSpec

log = logging.getLogger(__name__)

BASELINE_NAMES = {
    "dpo": "TRL DPOTrainer",
    "simpo": "TRL CPOTrainer(loss_type=simpo)",
    "orpo": "TRL ORPOTrainer",
    "cpo": "TRL CPOTrainer",
    "sft": "TRL SFTTrainer",
    "generate": "one prompt at a time",
}

TARGETS = {"dpo": 2.0, "simpo": 1.3, "orpo": 1.3, "cpo": 1.3, "sft": 1.3, "generate": 4.0}


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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        a, b = self.prefflow.result.tokens_per_s, self.baseline.result.tokens_per_s
        return a / b if a and b else None

    def to_json(self) -> dict[str, Any]:
        pf, bl = self.prefflow.result, self.baseline.result
        row = {
            "task": self.task, "model": self.model,
            "prefflow_tokens_per_s": _round(pf.tokens_per_s), "baseline_tokens_per_s": _round(bl.tokens_per_s),
            "ratio": _round(self.ratio, 3),
            "prefflow_peak_rss_mb": _round(self.prefflow.peak_rss_mb, 0),
            "baseline_peak_rss_mb": _round(self.baseline.peak_rss_mb, 0),
            "baseline": BASELINE_NAMES[self.task],
            "target_ratio": TARGETS[self.task],
            "device": pf.device, "threads": pf.threads, "params": pf.params,
            "prefflow_step_time_median_s": _round(pf.step_time_median_s, 4),
            "baseline_step_time_median_s": _round(bl.step_time_median_s, 4),
            "prefflow_train_tokens_per_s": _round(pf.train_tokens_per_s),
            "baseline_train_tokens_per_s": _round(bl.train_tokens_per_s),
            "prefflow_precompute_s": _round(pf.precompute_s, 2), "baseline_precompute_s": _round(bl.precompute_s, 2),
            "prefflow_first_loss": _round(pf.first_loss, 5), "baseline_first_loss": _round(bl.first_loss, 5),
            "measured_steps": len(pf.step_times_s),
            "prefflow_tokens": sum(pf.step_tokens), "baseline_tokens": sum(bl.step_tokens),
            "baseline_settings": bl.settings, "prefflow_settings": pf.settings,
            "load_avg_1m": [self.prefflow.load_before[0], self.prefflow.load_after[0],
                            self.baseline.load_before[0], self.baseline.load_after[0]],
            **self.extra,
        }
        if pf.cuda_peak_mb is not None or bl.cuda_peak_mb is not None:
            row.update(prefflow_cuda_peak_mb=_round(pf.cuda_peak_mb, 0), baseline_cuda_peak_mb=_round(bl.cuda_peak_mb, 0))
        if not pf.device.startswith("CPU"):
            row.update(prefflow_mfu=_round(hardware.mfu(pf.params, pf.train_tokens_per_s or 0, pf.device), 4),
                       baseline_mfu=_round(hardware.mfu(bl.params, bl.train_tokens_per_s or 0, bl.device), 4))
        if self.task == "generate":
            row.update(prefflow_prompts_per_s=_round(pf.prompts_per_s, 3),
                       baseline_prompts_per_s=_round(bl.prompts_per_s, 3),
                       prompts_ratio=_round(pf.prompts_per_s / bl.prompts_per_s, 3)
                       if pf.prompts_per_s and bl.prompts_per_s else None,
                       outputs_identical=pf.outputs == bl.outputs,
                       prompts=pf.prompts, max_new_tokens=pf.settings.get("max_new_tokens"),
                       prefflow_batch_size=pf.settings.get("batch_size"))
        return row


def _round(value, digits: int = 1):
    if value is None:
        return None
    return round(float(value), digits) if digits else round(float(value))


def run_side(spec: WorkerSpec, env: dict[str, str], log_dir: Path, timeout_s: float) -> SideRun:
    """Start one child, wait for it with ``wait4`` (its own peak RSS), and read its result file."""
    log_path = log_dir / f"{spec.task}-{spec.model}-{spec.side}-{Path(spec.out).stem}.log"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", spec.to_json()], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parents[1]))
        deadline = time.monotonic() + timeout_s
        status, rusage = 0, None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, rusage = os.wait4(proc.pid, 0)
                raise WorkerError(f"{spec.side} {spec.task} ({spec.model}) ran over {timeout_s:.0f}s; log: {log_path}")
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(spec.out).exists():
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise WorkerError(f"{spec.side} {spec.task} ({spec.model}) failed with exit code {proc.returncode}; "
                          f"log {log_path}:\n{tail}")
    result = SideResult.from_dict(json.loads(Path(spec.out).read_text(encoding="utf-8")))
    return SideRun(result, rusage.ru_maxrss / 1024.0, wall, load_before, os.getloadavg())


def _median_run(runs: list[SideRun]) -> SideRun:
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: r.result.tokens_per_s or 0.0)
    chosen = ordered[(len(ordered) - 1) // 2]
    return replace(chosen, peak_rss_mb=max(r.peak_rss_mb for r in runs))


def run_task(task: str, model: str, *, steps: int, warmup_steps: int, batch_size: int, max_len: int, threads: int,
             malloc: str, repeats: int, log_dir: Path, timeout_s: float, baseline_options: dict[str, Any],
             gen_prompts: int, gen_batch_size: int, gen_max_new_tokens: int) -> Row:
    env = hardware.child_env(threads, malloc)
    runs: dict[str, list[SideRun]] = {"prefflow": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="prefflow-bench-results-") as tmp:
        for repeat in range(repeats):
            order = ("prefflow", "baseline") if repeat % 2 == 0 else ("baseline", "prefflow")
            for side in order:
                spec = WorkerSpec(side=side, task=task, model=model, steps=steps, warmup_steps=warmup_steps,
                                  batch_size=batch_size, max_len=max_len, threads=threads,
                                  out=str(Path(tmp) / f"{side}-{repeat}.json"), gen_prompts=gen_prompts,
                                  gen_batch_size=gen_batch_size, gen_max_new_tokens=gen_max_new_tokens,
                                  options=baseline_options if side == "baseline" else {})
                log.info("running %s %s on %s (repeat %d/%d)", side, task, model, repeat + 1, repeats)
                run = run_side(spec, env, log_dir, timeout_s)
                runs[side].append(run)
                log.info("%s %s %s: %.1f tokens/s, peak RSS %.0f MiB, %.0fs wall, load %.2f",
                         side, task, model, run.result.tokens_per_s or 0.0, run.peak_rss_mb, run.wall_s,
                         run.load_after[0])
    row = Row(task, model, _median_run(runs["prefflow"]), _median_run(runs["baseline"]))
    if repeats > 1:
        row.extra["repeats"] = repeats
        row.extra["prefflow_tokens_per_s_runs"] = [_round(r.result.tokens_per_s) for r in runs["prefflow"]]
        row.extra["baseline_tokens_per_s_runs"] = [_round(r.result.tokens_per_s) for r in runs["baseline"]]
    row.extra["malloc"] = malloc
    return row


def format_table(rows: list[Row]) -> str:
    """Markdown table: one line per (task, model)."""
    gpu = any(not r.prefflow.result.device.startswith("CPU") for r in rows)
    head = ["task", "model", "PrefFlow tok/s", "baseline tok/s", "ratio", "target", "PrefFlow step med (s)",
            "baseline step med (s)", "PrefFlow peak RSS (MiB)", "baseline peak RSS (MiB)"]
    if gpu:
        head += ["PrefFlow MFU", "baseline MFU"]
    head += ["baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        j = r.to_json()
        ratio = j["ratio"]
        verdict = "" if ratio is None else (" ✓" if ratio >= TARGETS[r.task] else " ✗")
        cells = [r.task, r.model, _fmt(j["prefflow_tokens_per_s"]), _fmt(j["baseline_tokens_per_s"]),
                 (f"{ratio:.2f}x" if ratio is not None else "-") + verdict, f">= {TARGETS[r.task]:g}x",
                 _fmt(j["prefflow_step_time_median_s"], 2), _fmt(j["baseline_step_time_median_s"], 2),
                 _fmt(j["prefflow_peak_rss_mb"], 0), _fmt(j["baseline_peak_rss_mb"], 0)]
        if gpu:
            cells += [_pct(j.get("prefflow_mfu")), _pct(j.get("baseline_mfu"))]
        cells.append(j["baseline"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_notes(rows: list[Row]) -> str:
    """Per-row details that do not fit the table: precompute, train-only throughput, generation, load."""
    notes = []
    for r in rows:
        j = r.to_json()
        if r.task == "generate":
            notes.append(f"- generate/{r.model}: {j['prompts']} prompts, greedy, max {j['max_new_tokens']} new "
                         f"tokens; prompts/s {j['prefflow_prompts_per_s']} (batch {j['prefflow_batch_size']}) vs "
                         f"{j['baseline_prompts_per_s']} (batch 1) = {j['prompts_ratio']}x; "
                         f"identical outputs: {j['outputs_identical']}")
            continue
        text = (f"- {r.task}/{r.model}: {j['measured_steps']} measured steps; train-only tok/s "
                f"{j['prefflow_train_tokens_per_s']} vs {j['baseline_train_tokens_per_s']}")
        if j["prefflow_precompute_s"] is not None or j["baseline_precompute_s"] is not None:
            text += (f"; reference precompute {j['prefflow_precompute_s']}s vs {j['baseline_precompute_s']}s "
                     "(charged per token in tok/s)")
        text += (f"; first-step loss {j['prefflow_first_loss']} vs {j['baseline_first_loss']}"
                 + (" (both log 2: each model is its own reference)" if r.task == "dpo" else
                    " (different first batches: PrefFlow buckets by length, TRL samples at random)"))
        notes.append(text)
    loads = [x for r in rows for x in r.to_json()["load_avg_1m"]]
    if loads:
        notes.append(f"- 1-minute load average during the runs: {min(loads):.2f}-{max(loads):.2f} "
                     f"on {os.cpu_count()} CPUs")
    return "\n".join(notes)


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
