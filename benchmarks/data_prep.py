"""Scale of OpenAssistant data prep: time and peak RSS for generated exports (real trees format), per subprocess.

``python -m benchmarks.data_prep --sizes 20000,135000,1000000``; prints a table (``--json`` for JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

_WORD_TEXT = (
    "the of and to in is that for it as with was on be by this are or from at an have not which but can "
    "you they all we more one has their will about if there when so what out up some into time than other "
    "model data tree answer question reply rank prompt history learn train value reason simple example "
    "python tea river music garden book cloud bridge coffee map candle forest ocean bicycle lamp violin"
)
WORDS = _WORD_TEXT.split()
_POOL_RNG = random.Random(7)
POOL = " ".join(_POOL_RNG.choice(WORDS) for _ in range(400_000))
NAMESPACE = uuid.UUID("6f1d2c3e-8a4b-4c5d-9e6f-a1b2c3d4e5f6")


def _text(rng: random.Random, number: int, mean_chars: int) -> str:
    length = max(8, int(rng.lognormvariate(0, 0.6) * mean_chars))
    start = rng.randrange(0, len(POOL) - length - 1)
    return f"{number}: {POOL[start : start + length].strip()}"


def _node(
    rng: random.Random, tree: int, number: int, role: str, parent: str | None, rank: int | None, mean_chars: int
) -> dict[str, Any]:
    """One message with every key of the full export present (nulls written out)."""
    return {
        "message_id": str(uuid.uuid5(NAMESPACE, f"{tree}/{number}")),
        "parent_id": parent,
        "user_id": str(uuid.uuid5(NAMESPACE, f"user/{rng.randrange(5000)}")),
        "created_date": f"2023-{1 + tree % 12:02d}-{1 + number % 28:02d}T{number % 24:02d}:00:00.{number:06d}+00:00",
        "text": _text(rng, number, mean_chars),
        "role": role,
        "lang": "en" if rng.random() < 0.95 else "de",
        "review_count": 3,
        "review_result": rng.random() < 0.97,
        "deleted": rng.random() < 0.02,
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "detoxify": {"toxicity": round(rng.random() / 100, 5), "severe_toxicity": 0.0001},
        "emojis": {"name": ["+1"], "count": [rng.randrange(1, 5)]},
        "labels": {"name": ["spam", "quality"], "value": [0.0, round(rng.random(), 3)], "count": [3, 3]},
        "replies": [],
    }


def generate_export(path: Path, n_messages: int, *, seed: int = 0, mean_chars: int = 600) -> dict[str, Any]:
    """Write an export-format ``trees.jsonl`` of about ``n_messages`` messages: ranked replies, follow-ups."""
    rng = random.Random(seed)
    written = trees = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < n_messages:
            number = 0
            root = _node(rng, trees, number, "prompter", None, None, mean_chars // 3)
            frontier, count = [(root, 0)], 1
            while frontier:
                prompt, depth = frontier.pop()
                replies = rng.randint(2, 4)
                unranked = rng.random() < 0.1
                for rank in range(replies):
                    number += 1
                    reply = _node(
                        rng,
                        trees,
                        number,
                        "assistant",
                        prompt["message_id"],
                        None if unranked and rank == replies - 1 else rank,
                        mean_chars,
                    )
                    prompt["replies"].append(reply)
                    count += 1
                    if depth < 5 and rng.random() < 0.3:
                        number += 1
                        follow = _node(rng, trees, number, "prompter", reply["message_id"], None, mean_chars // 3)
                        reply["replies"].append(follow)
                        frontier.append((follow, depth + 2))
                        count += 1
            fh.write(
                json.dumps(
                    {"message_tree_id": root["message_id"], "tree_state": "ready_for_export", "prompt": root},
                    ensure_ascii=False,
                )
                + "\n"
            )
            written += count
            trees += 1
    return {"messages": written, "trees": trees, "bytes": path.stat().st_size}


def _status_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc: unlike ``ru_maxrss``, the peak of the
    address space exec started, not the parent's size at fork time (which ``ru_maxrss`` carries over)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(export: str, out_dir: str) -> dict[str, Any]:
    """Prepare ``export`` in this process; peak RSS (``VmHWM``) and RSS after imports, in KiB."""
    import logging

    from steps.data.oasst import prepare_oasst

    logging.disable(logging.INFO)
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    prepared = prepare_oasst(export, out_dir)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    stats = prepared.stats
    return {
        "seconds": seconds,
        "peak_rss_kib": peak,
        "baseline_rss_kib": baseline,
        "messages_read": stats["messages_read"],
        "sft_examples": stats["sft_examples"],
        "pairs": stats["pairs"]["best_vs_rest"],
    }


def measure(export: Path, workdir: Path) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter (its peak RSS is its own) and return its result."""
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    out = workdir / f"out-{export.stem}"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.data_prep", "--worker", str(export), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(f"data prep worker failed on {export}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    sizes: list[int], workdir: Path, *, seed: int = 0, mean_chars: int = 600, keep: bool = False
) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        export = workdir / f"export-{size}.trees.jsonl"
        generated = generate_export(export, size, seed=seed, mean_chars=mean_chars)
        result = measure(export, workdir)
        growth = (result["peak_rss_kib"] - result["baseline_rss_kib"]) * 1024
        rows.append({**generated, **result, "rss_growth_bytes_per_message": growth / generated["messages"]})
        if not keep:
            export.unlink()
            shutil.rmtree(workdir / f"out-{export.stem}", ignore_errors=True)
    for prev, row in itertools.pairwise(rows):
        row["slope_bytes_per_extra_message"] = (
            (row["peak_rss_kib"] - prev["peak_rss_kib"]) * 1024 / (row["messages"] - prev["messages"])
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| messages | trees | file MiB | time s | peak RSS MiB | RSS after imports MiB | growth B/message "
        "| slope B/extra message |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        slope = r.get("slope_bytes_per_extra_message")
        lines.append(
            f"| {r['messages']:,} | {r['trees']:,} | {r['bytes'] / 2**20:,.0f} | {r['seconds']:.1f} "
            f"| {r['peak_rss_kib'] / 1024:,.0f} | {r['baseline_rss_kib'] / 1024:,.0f} "
            f"| {r['rss_growth_bytes_per_message']:,.0f} | {'' if slope is None else f'{slope:,.0f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_prep", description=__doc__)
    parser.add_argument("--sizes", default="20000,135000,1000000", help="comma list of message counts")
    parser.add_argument("--mean-chars", type=int, default=600, help="mean reply length (prompts a third of it)")
    parser.add_argument("--workdir", type=Path, default=None, help="where exports go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated exports and outputs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("EXPORT", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.keep:
        if args.workdir is None:
            parser.error("--keep needs --workdir (where the exports and outputs stay)")
        args.workdir.mkdir(parents=True, exist_ok=True)
        rows = run(sizes, args.workdir, mean_chars=args.mean_chars, keep=True)
    else:
        with tempfile.TemporaryDirectory(prefix="prefflow-data-bench-", dir=args.workdir) as tmp:
            rows = run(sizes, Path(tmp), mean_chars=args.mean_chars)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    print(f"load average during the run: {os.getloadavg()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
