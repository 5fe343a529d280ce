"""Command line: ``python -m steps.evaluate {score,generate,annotate,agreement} ...``.

Each subcommand prints one JSON object on stdout (logs go to stderr).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from steps.io import read_json, read_jsonl, write_json

logger = logging.getLogger("steps.evaluate")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    from steps.evaluate.eval_sets import ALPACA_EVAL_SIZE, ALPACA_EVAL_SOURCES
    from steps.evaluate.scoring import score

    annotations = read_records(args.annotations)
    if args.alpaca_eval_order == "auto":
        sources_match = all(r.get("dataset") in ALPACA_EVAL_SOURCES for r in annotations)
        order = sources_match and (len(annotations) == ALPACA_EVAL_SIZE or args.subset)
    else:
        order = args.alpaca_eval_order == "yes"
    result = score(annotations, lc_assets_dir=args.lc_assets, subset=args.subset, alpaca_eval_order=order,
                   use_hub=not args.no_hub, source=str(args.annotations))
    return {"annotations": str(args.annotations), "alpaca_eval_order": order, **result}


def _cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from steps.evaluate import _generate_for, _generation_settings
    from steps.evaluate.eval_sets import load_eval_set

    eval_set = load_eval_set(args.eval_set, max_instructions=args.max_instructions)
    settings = _generation_settings(args.batch_size, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                    None)
    records, info = _generate_for(args.model, eval_set, args.generator or args.model, settings,
                                  backend=args.backend, device=args.device, dtype=args.dtype, model=None,
                                  tokenizer=None, show_progress=True)
    write_json(args.output, records)
    return {"output": str(args.output), "n": len(records), "eval_set": eval_set.name, "subset": eval_set.subset,
            **settings, **info}


def _judge_from_args(args: argparse.Namespace):
    from steps.evaluate.judges import make_judge

    kwargs: dict[str, Any] = {"device": args.device}
    if args.judge_model:
        kwargs["judge_model"] = args.judge_model
    if args.max_output_chars:
        kwargs["max_output_chars"] = args.max_output_chars
    judge = make_judge(args.judge, **kwargs)
    judge.check()
    return judge


def _cmd_annotate(args: argparse.Namespace) -> dict[str, Any]:
    from steps.evaluate.judges import annotate

    model_outputs = read_records(args.model_outputs)
    reference_outputs = read_records(args.reference_outputs)
    judge = _judge_from_args(args)
    annotations = annotate(model_outputs, reference_outputs, judge, cache_dir=args.cache_dir)
    write_json(args.output, annotations)
    return {"output": str(args.output), "n": len(annotations), **judge.metadata()}


def _cmd_agreement(args: argparse.Namespace) -> dict[str, Any]:
    from steps.evaluate.judges import judge_agreement

    official = read_records(args.annotations)
    judge = _judge_from_args(args)
    result = judge_agreement(official, judge, limit=args.limit, cache_dir=args.cache_dir)
    return {"annotations": str(args.annotations), "limit": args.limit, **result}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m steps.evaluate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="WR and LC WR of an alpaca_eval annotations file")
    p.add_argument("--annotations", required=True, type=Path)
    p.add_argument("--lc-assets", type=Path, default=None,
                   help="directory with df_gamed.csv and instruction_difficulty.csv (else the Hub, else none)")
    p.add_argument("--subset", action="store_true", help="the rows are a prefix of the eval set")
    p.add_argument("--alpaca-eval-order", choices=("auto", "yes", "no"), default="auto",
                   help="row i is AlpacaEval instruction i (auto: 805 rows from AlpacaEval's five sources)")
    p.add_argument("--no-hub", action="store_true", help="do not try to download the LC assets")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("generate", help="answer an eval set's instructions with a model")
    p.add_argument("--model", required=True)
    p.add_argument("--eval-set", required=True, help="'alpaca_eval', 'embedded' or a JSON file")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--generator", default=None, help="name recorded in the outputs (default: the model spec)")
    p.add_argument("--max-instructions", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1814)
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--device", default="auto", help="auto: cuda when a GPU is present")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=_cmd_generate)

    for name, helptext in (("annotate", "judge model outputs against reference outputs"),
                           ("agreement", "agreement of a judge with official annotations")):
        p = sub.add_parser(name, help=helptext)
        if name == "annotate":
            p.add_argument("--model-outputs", required=True, type=Path)
            p.add_argument("--reference-outputs", required=True, type=Path)
            p.add_argument("--output", required=True, type=Path)
        else:
            p.add_argument("--annotations", required=True, type=Path)
            p.add_argument("--limit", type=int, default=30)
        p.add_argument("--judge", default="local_logprob")
        p.add_argument("--judge-model", default=None, help="model spec of the local judge")
        p.add_argument("--max-output-chars", type=int, default=None)
        p.add_argument("--cache-dir", type=Path, default=None)
        p.add_argument("--device", default="auto", help="auto: cuda when a GPU is present")
        p.set_defaults(func=_cmd_annotate if name == "annotate" else _cmd_agreement)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
