"""Phase 2 of a round: a score for every usable sample, from a pairwise judge (any evaluation judge, alpaca_eval's
format, judgements cached per pair) or a pointwise reward model. Written once; a retried round with the same
samples and judge reuses the scores, and a killed one re-judges nothing already in the cache."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.evaluate.generation import ModelRun
from steps.io import atomic_write_files, jsonl_line, read_json, read_jsonl
from steps.onpolicy.pairwise import PromptAnswers, judge_answers
from steps.onpolicy.prompts import OnPolicyError
from steps.onpolicy.sampling import SampleSet, fingerprint, read_samples

if TYPE_CHECKING:
    from steps.onpolicy.config import OnPolicyConfig

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"
JUDGING_META_FILE = "judging.json"
JUDGE_CACHE_DIR = "judge_cache"
#: How pairwise judgements become per-answer scores (recorded, and part of the fingerprint).
PAIRWISE_SCORING = "mean_win_probability"


@dataclass(frozen=True)
class JudgedRound:
    """Per-sample scores (rows of ``scores.jsonl``), the raw judgements and the judging record."""

    scores: list[dict[str, Any]]
    judgements: list[dict[str, Any]]
    meta: dict[str, Any]
    reused: bool = False


def group_answers(samples: SampleSet) -> list[PromptAnswers]:
    """The distinct usable answers of each prompt, prompts in sample order."""
    groups: dict[str, PromptAnswers] = {}
    for row in samples.rows:
        group = groups.setdefault(row["prompt_id"], PromptAnswers(row["prompt_id"], row["instruction"]))
        if row["usable"]:
            group.add(row["sample"], row["output"])
    return list(groups.values())


def read_judged(round_dir: str | Path) -> JudgedRound:
    """The round's scores and judgements as :func:`judge_round` wrote them; an error naming the file otherwise."""
    round_dir = Path(round_dir)
    meta_path = round_dir / JUDGING_META_FILE
    if not meta_path.is_file():
        raise OnPolicyError(f"{round_dir}: no {JUDGING_META_FILE}; run judge_round first")
    meta = read_json(meta_path)
    for name in (SCORES_FILE, JUDGEMENTS_FILE):
        path = round_dir / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != meta.get(f"{name}_sha256"):
            raise OnPolicyError(f"{path}: missing or not the file {meta_path} records; run judge_round again")
    return JudgedRound(read_jsonl(round_dir / SCORES_FILE), read_jsonl(round_dir / JUDGEMENTS_FILE), meta, True)


def judge_round(
    round_dir: str | Path,
    cfg: OnPolicyConfig,
    *,
    judge_options: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    run: ModelRun = ModelRun(),
) -> JudgedRound:
    """Score the samples in ``round_dir`` with ``cfg.judge`` and write ``scores.jsonl``, ``judgements.jsonl`` and
    ``judging.json`` together, atomically.

    Pairwise judges are made by ``make_judge(cfg.judge, **judge_options)`` (``cfg.judge_options(evaluation's)``)
    on ``run``'s device and dtype; each new judgement is appended to ``cache_dir`` (default
    ``round_dir/judge_cache``) as it is made. ``reward_model:<spec>`` scores each answer in batches of
    ``cfg.batch_size``. Scores already written for the same samples and judge are returned as they are.
    """
    round_dir = Path(round_dir)
    samples = read_samples(round_dir)
    rm_spec = cfg.reward_model_spec
    judge = None
    if rm_spec is None:
        from steps.evaluate.judges import make_judge

        judge = make_judge(
            cfg.judge, device=run.device, dtype=run.dtype, show_progress=run.show_progress, **dict(judge_options or {})
        )
        judge.check()
        identity, scoring = judge.cache_identity, PAIRWISE_SCORING
    else:
        identity, scoring = f"reward_model:{rm_spec}", "reward"
    wanted = fingerprint({"samples": samples.meta["fingerprint"], "judge": identity, "scoring": scoring})
    try:
        found = read_judged(round_dir)
    except (OnPolicyError, OSError, ValueError):
        found = None
    if found is not None and found.meta.get("fingerprint") == wanted:
        logger.info("round %s: reusing the scores in %s (same samples and judge)", samples.meta["round"], round_dir)
        return found
    started = time.monotonic()
    groups = group_answers(samples)
    if judge is not None:
        answer_scores, judgements, record = _pairwise(groups, judge, Path(cache_dir or round_dir / JUDGE_CACHE_DIR))
        del judge
        gc.collect()
    else:
        answer_scores, judgements, record = _pointwise(groups, rm_spec or "", cfg.batch_size, run)
    scores = _score_rows(samples, groups, answer_scores)
    meta = {
        "fingerprint": wanted,
        "round": samples.meta["round"],
        "judge_identity": identity,
        "scoring": scoring,
        "prompts": len(groups),
        "answers": sum(len(g.texts) for g in groups),
        **record,
        "seconds": time.monotonic() - started,
    }
    files = {SCORES_FILE: b"".join(map(jsonl_line, scores)), JUDGEMENTS_FILE: b"".join(map(jsonl_line, judgements))}
    meta.update({f"{name}_sha256": hashlib.sha256(data).hexdigest() for name, data in files.items()})
    meta_bytes = (json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    atomic_write_files({**{round_dir / n: d for n, d in files.items()}, round_dir / JUDGING_META_FILE: meta_bytes})
    logger.info(
        "round %s: scored %d answers of %d prompts with %s (%d judgements, %d cached, %d requests) in %.1f s",
        meta["round"],
        meta["answers"],
        meta["prompts"],
        meta["judge"],
        meta["judgements"],
        meta["judgements_cached"],
        meta["judge_requests"],
        meta["seconds"],
    )
    return JudgedRound(scores, judgements, meta)


def _pairwise(
    groups: list[PromptAnswers], judge: Any, cache_dir: Path
) -> tuple[list[list[float | None]], list[dict[str, Any]], dict[str, Any]]:
    from steps.evaluate.judge_cost import judge_cost, judge_usage

    result = judge_answers(groups, judge, cache_dir)
    tokens = judge_usage(result.annotations)
    cost, _, cost_note = judge_cost(tokens, judge.price_model)
    new = len(result.annotations) - result.cached
    record = {
        **judge.metadata(),
        "kind": "pairwise",
        "judgements": len(result.annotations),
        "judgements_cached": result.cached,
        "judgements_new": new,
        # served judges count HTTP attempts (retries included); a local judge makes one forward pass per new one
        "judge_requests": getattr(judge, "requests_made", new),
        "judge_prompt_tokens": tokens["prompt"],
        "judge_completion_tokens": tokens["completion"],
        "judge_cost_usd": cost,
        "judge_cost_note": cost_note,
        "judge_cache": str(cache_dir),
    }
    return result.scores, result.annotations, record


def _pointwise(
    groups: list[PromptAnswers], spec: str, batch_size: int, run: ModelRun
) -> tuple[list[list[float | None]], list[dict[str, Any]], dict[str, Any]]:
    from steps.onpolicy.reward_model import RewardModelScorer

    scorer = RewardModelScorer(spec, device=run.device, dtype=run.dtype, batch_size=batch_size)
    inputs = [(g.instruction, text) for g in groups for text in g.texts]
    try:
        result = scorer.score(inputs, show_progress=run.show_progress)
    finally:
        scorer.close()
    scores: list[list[float | None]] = []
    judgements = []
    position = 0
    for group in groups:
        scores.append(list(result.rewards[position : position + len(group.texts)]))
        for answer in range(len(group.texts)):
            judgements.append(
                {
                    "prompt_id": group.prompt_id,
                    "answer": answer,
                    "reward": result.rewards[position],
                    "tokens": result.tokens[position],
                }
            )
            position += 1
    record = {
        "judge": scorer.label,
        "weak_judge": False,
        "kind": "reward_model",
        "judgements": len(inputs),
        "judgements_cached": 0,
        "judgements_new": len(inputs),
        "judge_requests": len(inputs),
        "judge_prompt_tokens": sum(result.tokens),
        "judge_completion_tokens": 0,
        "judge_cost_usd": None,
        "judge_cost_note": "local reward model: no per-token price",
    }
    return scores, judgements, record


def _score_rows(
    samples: SampleSet, groups: list[PromptAnswers], answer_scores: list[list[float | None]]
) -> list[dict[str, Any]]:
    """One row per sample: its distinct-answer index and score (None: unusable or never judged)."""
    by_prompt = {g.prompt_id: (g, s) for g, s in zip(groups, answer_scores)}
    rows = []
    for row in samples.rows:
        group, scores = by_prompt[row["prompt_id"]]
        answer = group.sample_text.get(row["sample"])
        rows.append(
            {
                "prompt_id": row["prompt_id"],
                "sample": row["sample"],
                "answer": answer,
                "score": None if answer is None else scores[answer],
            }
        )
    return rows
