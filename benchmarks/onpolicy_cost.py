"""What one on-policy round costs: tokens generated and judged per prompt, and seconds, for a policy sampling k
answers per prompt and the local judge comparing every two of them (steps.onpolicy).

``python -m benchmarks.onpolicy_cost --models tiny,embedded:smollm2-135m-instruct --ks 2,4 --prompts 6``; prints a
table, ``--json PATH`` writes the rows. Models are loaded before the clock starts (load time reported apart); the
judge is the policy's own model (the offline default pairing: the 135M model judging itself; tiny judging tiny).
``generated`` is the decoder's own count of sampled tokens; ``answers`` the answers re-encoded as training reads
them (round_stats.json reports this one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from steps.evaluate.generation import ModelRun
from steps.io import read_json
from steps.onpolicy.config import OnPolicyConfig
from steps.onpolicy.judging import judge_round
from steps.onpolicy.pairs import STATS_FILE, build_pairs
from steps.onpolicy.prompts import OnPolicyError, load_round_prompts
from steps.onpolicy.sampling import sample_round

DECODER_LOGGER = "steps.evaluate.generation"


class DecoderStats(logging.Handler):
    """Reads the continuous-batching decoder's summary line (prompt tokens prefilled, tokens generated)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.prefill_tokens: int | None = None
        self.generated_tokens: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("continuous batching") and isinstance(record.args, tuple):
            prefill, generated = record.args[4], record.args[7]
            if isinstance(prefill, int) and isinstance(generated, int):
                self.prefill_tokens, self.generated_tokens = prefill, generated


def measure(model_spec: str, k: int, prompts_n: int, max_new_tokens: int, data_dir: Path, work: Path) -> dict:
    """One round of ``k`` samples for ``prompts_n`` train prompts with ``model_spec``, judged by the same model."""
    from steps.models import load_model, load_tokenizer

    started = time.monotonic()
    model, tokenizer = load_model(model_spec), load_tokenizer(model_spec)
    load_s = time.monotonic() - started
    cfg = OnPolicyConfig(
        enabled=True,
        samples_per_prompt=k,
        max_prompts=prompts_n,
        max_new_tokens=max_new_tokens,
        batch_size=8,
        judge="local_logprob",
        judge_model=model_spec,
    )
    prompts, _ = load_round_prompts("train", data_dir, 0, cfg.max_prompts, cfg.seed)
    decoder, generation_logger = DecoderStats(), logging.getLogger(DECODER_LOGGER)
    level = generation_logger.level
    generation_logger.addHandler(decoder)
    generation_logger.setLevel(logging.INFO)
    try:
        run = ModelRun(model=model, tokenizer=tokenizer, show_progress=False)
        sample_round(model_spec, prompts, cfg, 0, work, run)
    finally:
        generation_logger.removeHandler(decoder)
        generation_logger.setLevel(level)
    options = {"judge_model": model_spec, "model": model, "tokenizer": tokenizer}
    judge_round(work, cfg, judge_options=options, run=ModelRun(show_progress=False))
    with contextlib.suppress(OnPolicyError):  # no pair kept: the stats are written all the same
        build_pairs(work, cfg)
    stats = read_json(work / STATS_FILE)
    n = stats["prompts"]
    tokens = stats["tokens"]
    return {
        "model": model_spec,
        "k": k,
        "prompts": n,
        "max_new_tokens": max_new_tokens,
        "judgements": stats["judgements"],
        "judgements_per_prompt": stats["judgements"] / n,
        "generated_per_prompt": decoder.generated_tokens / n if decoder.generated_tokens is not None else None,
        "answers_per_prompt": tokens["answers_per_prompt"],
        "prefill_per_prompt": tokens["prompt"] / n,
        "judge_prompt_per_prompt": tokens["judge_prompt"] / n,
        "judge_prompt_per_judgement": tokens["judge_prompt"] / max(1, stats["judgements"]),
        "sampling_s_per_prompt": stats["seconds"]["sampling"] / n,
        "judging_s_per_prompt": stats["seconds"]["judging"] / n,
        "model_load_s": load_s,
        "pairs_kept": stats["pairs_kept"],
        "dropped_ties": stats["dropped_ties"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | k | prompts | generated/prompt | answer tokens/prompt | judgements/prompt | judged tokens/prompt "
        "| sampling s/prompt | judging s/prompt |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        generated = "n/a" if r["generated_per_prompt"] is None else f"{r['generated_per_prompt']:.0f}"
        lines.append(
            f"| {r['model']} | {r['k']} | {r['prompts']} | {generated} | {r['answers_per_prompt']:.0f} "
            f"| {r['judgements_per_prompt']:.1f} | {r['judge_prompt_per_prompt']:.0f} "
            f"| {r['sampling_s_per_prompt']:.2f} | {r['judging_s_per_prompt']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,embedded:smollm2-135m-instruct")
    parser.add_argument("--ks", default="2,4")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from steps.data import prepare_oasst

    rows = []
    with tempfile.TemporaryDirectory(prefix="onpolicy-cost-") as tmp:
        data_dir = Path(prepare_oasst("embedded", Path(tmp) / "data").output_dir)
        for model_spec in args.models.split(","):
            for k in (int(v) for v in args.ks.split(",")):
                work = Path(tmp) / f"{model_spec.replace(':', '_')}-k{k}"
                rows.append(measure(model_spec, k, args.prompts, args.max_new_tokens, data_dir, work))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
