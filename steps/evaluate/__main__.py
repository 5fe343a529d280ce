"""Command line: ``python -m steps.evaluate {score,generate,annotate,agreement} ...``; each subcommand prints
one JSON object on stdout (logs go to stderr)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from steps.evaluate.agreement import judge_agreement, record_agreement, registry_path
from steps.evaluate.annotate import annotate
from steps.evaluate.eval_sets import ALPACA_EVAL_SIZE, ALPACA_EVAL_SOURCES, load_eval_set
from steps.evaluate.generation import BACKENDS, ModelRun, answer_eval_set
from steps.evaluate.judges import (
    DEFAULT_CONCURRENCY,
    DEFAULT_JUDGE,
    DEFAULT_JUDGE_MAX_CHARS,
    DEFAULT_TIMEOUT_S,
    Judge,
    make_judge,
)
from steps.evaluate.paired import PAIRED_RESAMPLES, PAIRED_SEED, paired_comparison
from steps.evaluate.scoring import score
from steps.evaluate.settings import JUDGE_OPTIONS, GenerationSettings
from steps.io import read_json, read_jsonl, write_json
from steps.models import DEFAULT_MODEL


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
    annotations = read_records(args.annotations)
    if args.alpaca_eval_order == "auto":
        sources_match = all(r.get("dataset") in ALPACA_EVAL_SOURCES for r in annotations)
        order = sources_match and (len(annotations) == ALPACA_EVAL_SIZE or args.subset)
    else:
        order = args.alpaca_eval_order == "yes"
    result = score(
        annotations,
        lc_assets_dir=args.lc_assets,
        subset=args.subset,
        alpaca_eval_order=order,
        use_hub=not args.no_hub,
        source=str(args.annotations),
    )
    out = {"annotations": str(args.annotations), "alpaca_eval_order": order, **asdict(result)}
    if args.baseline_annotations is not None:
        paired = paired_comparison(
            annotations,
            read_records(args.baseline_annotations),
            seed=args.paired_seed,
            resamples=args.paired_resamples,
            source=str(args.annotations),
            baseline_source=str(args.baseline_annotations),
        )
        paired["paired_distinguishable"] = paired.pop("distinguishable")
        out.update(baseline_annotations=str(args.baseline_annotations), **paired)
    return out


def _cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    generation = GenerationSettings.from_config(args)  # the flags are named like the settings
    eval_set = load_eval_set(args.eval_set, max_instructions=args.max_instructions)
    run = ModelRun(backend=args.backend, device=args.device, dtype=args.dtype)
    records, info = answer_eval_set(args.model, eval_set, args.generator or args.model, generation, run)
    write_json(args.output, records)
    return {
        "output": str(args.output),
        "n": len(records),
        "eval_set": eval_set.name,
        "subset": eval_set.subset,
        **generation.record(),
        **info,
    }


def _judge_from_args(args: argparse.Namespace) -> Judge:
    judge = make_judge(args.judge, device=args.device, **{name: getattr(args, name) for name in JUDGE_OPTIONS})
    judge.check()
    return judge


def _cmd_annotate(args: argparse.Namespace) -> dict[str, Any]:
    model_outputs = read_records(args.model_outputs)
    reference_outputs = read_records(args.reference_outputs)
    judge = _judge_from_args(args)
    annotations = annotate(model_outputs, reference_outputs, judge, cache_dir=args.cache_dir)
    write_json(args.output, annotations)
    return {"output": str(args.output), "n": len(annotations), **judge.metadata()}


def _cmd_agreement(args: argparse.Namespace) -> dict[str, Any]:
    official = read_records(args.annotations)
    judge = _judge_from_args(args)
    result = judge_agreement(official, judge, limit=args.limit, cache_dir=args.cache_dir)
    recorded = None
    if not args.no_record:
        recorded = str(registry_path(args.registry))
        record_agreement(result, judge, args.annotations, args.limit, path=recorded)
    return {"annotations": str(args.annotations), "limit": args.limit, **result, "recorded_in": recorded}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; required flags say so, and a help text may spell out a default in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required:
            return f"{action.help} (required)"
        if "(default: " in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m steps.evaluate`` and its four subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m steps.evaluate", description=__doc__, formatter_class=_HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def subcommand(name: str, helptext: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=helptext, description=helptext, formatter_class=_HelpFormatter)

    _score_arguments(subcommand("score", "WR and LC WR of an alpaca_eval annotations file"))
    _generate_arguments(subcommand("generate", "answer an eval set's instructions with a model"))
    _annotate_arguments(subcommand("annotate", "judge model outputs against reference outputs"))
    _agreement_arguments(subcommand("agreement", "agreement of a judge with official annotations"))
    return parser


def _score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, type=Path, help="alpaca_eval annotations (JSON list or JSONL)")
    p.add_argument(
        "--lc-assets",
        type=Path,
        default=None,
        help="directory with df_gamed.csv and instruction_difficulty.csv (default: the Hub's, else LC without them)",
    )
    p.add_argument("--subset", action="store_true", help="the rows are a prefix of the eval set")
    p.add_argument(
        "--alpaca-eval-order",
        choices=("auto", "yes", "no"),
        default="auto",
        help="row i is AlpacaEval instruction i (auto: 805 rows from AlpacaEval's five sources)",
    )
    p.add_argument("--no-hub", action="store_true", help="do not try to download the LC assets")
    p.add_argument(
        "--baseline-annotations",
        type=Path,
        default=None,
        help="annotations of a second model on the same instructions and reference: adds the paired "
        "difference paired_delta_wr with its bootstrap paired_ci95 (default: no comparison)",
    )
    p.add_argument(
        "--paired-resamples", type=int, default=PAIRED_RESAMPLES, help="bootstrap resamples of the paired interval"
    )
    p.add_argument("--paired-seed", type=int, default=PAIRED_SEED, help="seed of the paired bootstrap")
    p.set_defaults(func=_cmd_score)


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    defaults = GenerationSettings()
    p.add_argument("--model", required=True, help="model spec: 'embedded:...', 'tiny', a directory or a Hub id")
    p.add_argument("--eval-set", required=True, help="'alpaca_eval', 'embedded' or a JSON file")
    p.add_argument("--output", required=True, type=Path, help="where to write the model_outputs JSON")
    p.add_argument("--generator", default=None, help="name recorded in the outputs (default: the model spec)")
    p.add_argument("--max-instructions", type=int, default=None, help="answer only this prefix (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="tokens per answer at most")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompts decoded at once")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the per-prompt sampling generators")
    run = ModelRun()  # how a model answers unless told otherwise: ModelRun owns the defaults
    p.add_argument("--backend", choices=BACKENDS, default=run.backend, help="auto: vllm with a GPU and vllm, else hf")
    p.add_argument("--device", default=run.device, help="auto: cuda when a GPU is present, else cpu")
    p.add_argument("--dtype", default=run.dtype, help="weights dtype of the HF backend")
    p.set_defaults(func=_cmd_generate)


def _annotate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-outputs", required=True, type=Path, help="model outputs (output_2)")
    p.add_argument("--reference-outputs", required=True, type=Path, help="reference outputs (output_1)")
    p.add_argument("--output", required=True, type=Path, help="where to write the annotations JSON")
    _judge_arguments(p)
    p.set_defaults(func=_cmd_annotate)


def _agreement_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, type=Path, help="official alpaca_eval annotations")
    p.add_argument("--limit", type=int, default=30, help="judge only the first LIMIT rows")
    p.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="agreement registry JSON to record the measurement in (default: the file "
        "named by PREFFLOW_AGREEMENT_REGISTRY, else judge_agreement.json in the PrefFlow "
        "cache)",
    )
    p.add_argument("--no-record", action="store_true", help="measure only; leave the registry as it is")
    _judge_arguments(p)
    p.set_defaults(func=_cmd_agreement)


def _judge_arguments(p: argparse.ArgumentParser) -> None:
    """The judge flags annotate and agreement share (named like the config's ``evaluation.judge_*`` knobs)."""
    p.add_argument(
        "--judge",
        default=DEFAULT_JUDGE,
        help="'local_logprob', 'local_logprob:<model spec>', 'openai_compatible' (a served model) or "
        "'alpaca_eval:<annotator config>'",
    )
    p.add_argument(
        "--judge-model",
        default=DEFAULT_MODEL,
        help="model spec of the local judge, or the served model's name for openai_compatible",
    )
    p.add_argument(
        "--judge-base-url",
        default=None,
        help="openai_compatible: the server's API root, e.g. http://localhost:8000/v1 (default: none)",
    )
    p.add_argument(
        "--judge-api-key-env",
        default=None,
        help="openai_compatible: name of the environment variable holding the API key (default: none, no key sent)",
    )
    p.add_argument(
        "--judge-max-requests",
        type=int,
        default=None,
        help="openai_compatible: most HTTP requests, retries included (default: twice the pairs, plus 10)",
    )
    p.add_argument(
        "--judge-timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="openai_compatible: seconds to wait for each reply before retrying",
    )
    p.add_argument(
        "--judge-concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="openai_compatible: requests in flight at once",
    )
    p.add_argument(
        "--judge-max-chars",
        type=int,
        default=DEFAULT_JUDGE_MAX_CHARS,
        help="the local judge cuts each output to this many characters",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="reuse and keep judgements here (default: no cache)")
    p.add_argument("--device", default=ModelRun.device, help="auto: cuda when a GPU is present, else cpu")


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
