"""``python -m benchmarks``: PrefFlow against TRL (and batched against one-at-a-time generation), side by side.

Prints a markdown table and notes, and with ``--json`` the rows as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.runner import format_notes, format_table, run_task
from benchmarks.spec import MODELS, TASKS

logger = logging.getLogger("benchmarks")

EPILOG = """example:
    python -m benchmarks --model tiny --task dpo,dpo_lora,simpo,orpo,cpo,sft,generate --steps 8 --json

Both sides get the same model, synthetic data (benchmarks.synthetic), batch size, max length, steps, threads
and malloc settings, each in its own process; MFU is taken against a bf16 data-sheet peak on GPU and an fp32
GEMM probe of the model's shapes on CPU, measured in the same run (benchmarks.flops, benchmarks.probe).
"""


class BenchArgumentError(ValueError):
    """A bad command-line value (unknown task or model, non-positive count)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; bad values raise :class:`BenchArgumentError` naming the flag."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="tiny", help=f"one or more of {', '.join(MODELS)} (comma-separated)")
    parser.add_argument("--task", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per side (after warmup)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps run first and not measured")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs (or SFT examples) per step")
    parser.add_argument("--max-len", type=int, default=256, help="max tokens per sequence")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    parser.add_argument(
        "--malloc",
        default="tuned",
        choices=["tuned", "default"],
        help="glibc malloc preset applied to both sides (see benchmarks.hardware)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times, keep medians")
    parser.add_argument(
        "--gen-prompts", type=int, default=16, help="instructions for the generate task (1-24: the embedded eval set)"
    )
    parser.add_argument(
        "--gen-batch-size",
        type=int,
        default=16,
        help="PrefFlow's generation batch size (evaluation.batch_size in configs/default.yaml)",
    )
    parser.add_argument("--gen-max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--baseline-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="TRL setting to change (sampling=group_by_length, precompute_ref=false, padding_free=true)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per side before giving up")
    parser.add_argument("--log-dir", default=None, help="where the children's logs go (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on the last line")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    args.tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    for m in args.models:
        if m not in MODELS:
            raise BenchArgumentError(f"--model {m!r}: use one of {', '.join(MODELS)}")
    for t in args.tasks:
        if t not in TASKS:
            raise BenchArgumentError(f"--task {t!r}: use a comma-separated subset of {', '.join(TASKS)}")
    for name in (
        "steps",
        "batch_size",
        "max_len",
        "threads",
        "repeats",
        "gen_prompts",
        "gen_batch_size",
        "gen_max_new_tokens",
    ):
        if getattr(args, name) < 1:
            raise BenchArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        raise BenchArgumentError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    args.baseline_options = {}
    for item in args.baseline_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchArgumentError(f"--baseline-option {item!r}: expected KEY=VALUE")
        args.baseline_options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every (model, task) pair and print the table, the notes and optionally the JSON rows."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args = parse_args(argv)
    except BenchArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="prefflow-bench-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    logger.info("children's logs: %s", log_dir)
    rows = []
    for model in args.models:
        for task in args.tasks:
            rows.append(
                run_task(
                    task,
                    model,
                    steps=args.steps,
                    warmup_steps=args.warmup_steps,
                    batch_size=args.batch_size,
                    max_len=args.max_len,
                    threads=args.threads,
                    malloc=args.malloc,
                    repeats=args.repeats,
                    log_dir=log_dir,
                    timeout_s=args.timeout,
                    baseline_options=args.baseline_options,
                    gen_prompts=args.gen_prompts,
                    gen_batch_size=args.gen_batch_size,
                    gen_max_new_tokens=args.gen_max_new_tokens,
                )
            )
    device = rows[0].prefflow.result.device if rows else "?"
    print(
        f"PrefFlow vs baseline on {device}, {args.threads} threads, malloc={args.malloc}, batch {args.batch_size} x "
        f"max length {args.max_len}, {args.steps} measured steps after {args.warmup_steps} warmup"
    )
    print()
    print(format_table(rows))
    print()
    print(format_notes(rows))
    if args.json:
        print(json.dumps([r.to_json() for r in rows]))
    return 0
