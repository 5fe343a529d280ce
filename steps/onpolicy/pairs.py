"""Phase 3 of a round: preference pairs from scored answers (ties and margins under ``min_margin`` dropped and
counted), written as the round's ``preference.train.jsonl`` in the prepared data's row layout, and the round's
``round_stats.json`` (what it generated, judged, kept and dropped; what it cost in tokens and seconds)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.data.records import pair_row
from steps.io import atomic_write_files, jsonl_line
from steps.onpolicy.judging import read_judged
from steps.onpolicy.prompts import OnPolicyError
from steps.onpolicy.sampling import read_samples

if TYPE_CHECKING:
    from steps.onpolicy.config import OnPolicyConfig

logger = logging.getLogger(__name__)

TRAIN_FILE = "preference.train.jsonl"
DEV_FILE = "preference.dev.jsonl"
STATS_FILE = "round_stats.json"
#: What pair building counts, always present in the stats (0 when nothing happened).
PAIR_COUNTS = (
    "prompts_without_two_answers",
    "unscored_answers",
    "candidate_pairs",
    "dropped_ties",
    "dropped_small_margin",
    "pairs_kept",
)


@dataclass(frozen=True)
class ChosenPair:
    """Indices of the chosen and rejected answer and the score margin between them (> 0)."""

    chosen: int
    rejected: int
    margin: float


def _judge_candidate(chosen: int, rejected: int, margin: float, min_margin: float, counts: Counter) -> list:
    counts["candidate_pairs"] += 1
    if margin == 0:
        counts["dropped_ties"] += 1
        return []
    if margin < min_margin:
        counts["dropped_small_margin"] += 1
        return []
    counts["pairs_kept"] += 1
    return [ChosenPair(chosen, rejected, margin)]


def select_pairs(scores: Sequence[float | None], pairing: str, min_margin: float, counts: Counter) -> list[ChosenPair]:
    """The pairs of one prompt's distinct answers (``scores[i]`` is answer i's score, None: unscored).

    ``best_vs_worst``: the highest score (first on ties) against the lowest (last on ties). ``best_vs_rest``: the
    best against every other answer. ``all_pairs``: every two answers, the higher-scored chosen. A candidate with
    equal scores is a tie; one whose margin is under ``min_margin`` is dropped too; both are counted in ``counts``.
    """
    scored = [(i, float(s)) for i, s in enumerate(scores) if s is not None]
    counts["unscored_answers"] += len(scores) - len(scored)
    if len(scored) < 2:
        counts["prompts_without_two_answers"] += 1
        return []
    best = max(scored, key=lambda item: (item[1], -item[0]))
    if pairing == "best_vs_worst":
        worst = min(scored, key=lambda item: (item[1], -item[0]))
        return _judge_candidate(best[0], worst[0], best[1] - worst[1], min_margin, counts)
    if pairing == "best_vs_rest":
        return [
            pair
            for index, score in scored
            if index != best[0]
            for pair in _judge_candidate(best[0], index, best[1] - score, min_margin, counts)
        ]
    if pairing == "all_pairs":
        out = []
        for a, (i, si) in enumerate(scored):
            for j, sj in scored[a + 1 :]:
                high, low = ((i, si), (j, sj)) if si >= sj else ((j, sj), (i, si))
                out += _judge_candidate(high[0], low[0], high[1] - low[1], min_margin, counts)
        return out
    raise OnPolicyError(f"pairing must be best_vs_worst, best_vs_rest or all_pairs, got {pairing!r}")


@dataclass(frozen=True)
class RoundPairs:
    """The round's pair rows and its stats (as written to ``preference.train.jsonl`` and ``round_stats.json``)."""

    rows: list[dict[str, Any]]
    stats: dict[str, Any]


def _prompt_answers(round_dir: Path) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Samples, judging, and per prompt: its instruction, distinct-answer texts, scores and first samples."""
    samples, judged = read_samples(round_dir), read_judged(round_dir)
    if judged.meta.get("fingerprint") is None or judged.meta.get("round") != samples.meta.get("round"):
        raise OnPolicyError(f"{round_dir}: scores and samples are of different rounds; run judge_round again")
    prompts: dict[str, dict[str, Any]] = {}
    for sample, score in zip(samples.rows, judged.scores):
        if (sample["prompt_id"], sample["sample"]) != (score["prompt_id"], score["sample"]):
            raise OnPolicyError(f"{round_dir}: scores.jsonl does not follow samples.jsonl; run judge_round again")
        entry = prompts.setdefault(sample["prompt_id"], {"instruction": sample["instruction"], "answers": {}})
        if score["answer"] is not None:
            entry["answers"].setdefault(score["answer"], (sample["sample"], sample["output"], score["score"]))
    groups = []
    for prompt_id, entry in prompts.items():
        answers = [entry["answers"][i] for i in sorted(entry["answers"])]
        groups.append({"prompt_id": prompt_id, "instruction": entry["instruction"], "answers": answers})
    return samples, judged, groups


def build_pairs(round_dir: str | Path, cfg: OnPolicyConfig, dev_file: str | Path | None = None) -> RoundPairs:
    """Pair the scored answers in ``round_dir`` as ``cfg.pairing`` says and write ``preference.train.jsonl``,
    ``round_stats.json`` and (given ``dev_file``, the prepared ``preference.dev.jsonl``) a copy of the dev pairs,
    so that ``round_dir`` is a data directory the preference trainer reads as it is. Recomputed on every call from
    the round's samples and scores (cheap, same result). No pair kept: the stats are written and OnPolicyError
    says what to change."""
    round_dir = Path(round_dir)
    samples, judged, groups = _prompt_answers(round_dir)
    round_index = samples.meta["round"]
    counts: Counter = Counter(dict.fromkeys(PAIR_COUNTS, 0))
    rows = []
    for group in groups:
        answers = group["answers"]
        for pair in select_pairs([a[2] for a in answers], cfg.pairing, cfg.min_margin, counts):
            (c_sample, chosen, c_score), (r_sample, rejected, r_score) = answers[pair.chosen], answers[pair.rejected]
            rows.append(
                pair_row(
                    f"onpolicy-r{round_index}-{group['prompt_id']}-s{c_sample}-s{r_sample}",
                    "prompt_id",
                    group["prompt_id"],
                    [{"role": "user", "content": group["instruction"]}],
                    chosen,
                    rejected,
                    round=round_index,
                    chosen_sample=c_sample,
                    rejected_sample=r_sample,
                    chosen_score=c_score,
                    rejected_score=r_score,
                    margin=pair.margin,
                )
            )
    stats = round_stats(samples.meta, judged.meta, counts, cfg)
    files: dict[str | os.PathLike, bytes] = {
        round_dir / STATS_FILE: (json.dumps(stats, indent=2, default=str) + "\n").encode("utf-8")
    }
    if rows:
        files[round_dir / TRAIN_FILE] = b"".join(map(jsonl_line, rows))
        if dev_file is not None:
            files[round_dir / DEV_FILE] = Path(dev_file).read_bytes()
    else:
        (round_dir / TRAIN_FILE).unlink(missing_ok=True)  # never leave an earlier attempt's pairs to train on
    atomic_write_files(files)
    logger.info(
        "round %s: %d pairs kept of %d candidates (%d ties, %d under min_margin %g) -> %s",
        round_index,
        counts["pairs_kept"],
        counts["candidate_pairs"],
        counts["dropped_ties"],
        counts["dropped_small_margin"],
        cfg.min_margin,
        round_dir / TRAIN_FILE,
    )
    if not rows:
        raise OnPolicyError(
            f"{round_dir}: round {round_index} kept no pair ({dict(counts)}; see {STATS_FILE}); raise "
            "preference.on_policy.samples_per_prompt, temperature or max_prompts, or lower min_margin"
        )
    return RoundPairs(rows, stats)


def round_stats(
    samples: dict[str, Any], judging: dict[str, Any], counts: Counter, cfg: OnPolicyConfig
) -> dict[str, Any]:
    """What the round did and cost: counts, tokens generated and judged (in total and per prompt), seconds."""
    prompts = samples["prompts"] or 1
    judged_tokens = judging["judge_prompt_tokens"] + judging["judge_completion_tokens"]
    return {
        "round": samples["round"],
        "policy": samples["policy"],
        "judge": judging["judge"],
        "weak_judge": judging.get("weak_judge", False),
        "scoring": judging["scoring"],
        "pairing": cfg.pairing,
        "min_margin": cfg.min_margin,
        "prompts": samples["prompts"],
        "samples_per_prompt": samples["samples_per_prompt"],
        "samples": samples["samples"],
        "unusable_samples": samples["unusable"],
        "distinct_answers": judging["answers"],
        "judgements": judging["judgements"],
        "judgements_cached": judging["judgements_cached"],
        "judgements_new": judging["judgements_new"],
        "judge_requests": judging["judge_requests"],
        **{name: counts[name] for name in PAIR_COUNTS},
        # prompt: prefill tokens (each sample's prompt); answers: the answers as training encodes them (the
        # decoded text re-encoded, end-of-turn included; for a trained model about the tokens generated);
        # judge: what the judge read and wrote, cached judgements included (each was paid once)
        "tokens": {
            "prompt": samples["prompt_tokens"],
            "answers": samples["answer_tokens"],
            "judge_prompt": judging["judge_prompt_tokens"],
            "judge_completion": judging["judge_completion_tokens"],
            "answers_per_prompt": samples["answer_tokens"] / prompts,
            "judged_per_prompt": judged_tokens / prompts,
        },
        "seconds": {"sampling": samples["seconds"], "judging": judging["seconds"]},
        "judge_cost_usd": judging.get("judge_cost_usd"),
        "judge_cost_note": judging.get("judge_cost_note"),
    }
