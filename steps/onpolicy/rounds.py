"""One on-policy round's data, phase by phase: prompts -> samples -> scores -> pairs, each phase written once under
the round's directory and reused when its inputs are unchanged, so a retried or resumed round redoes only what
is missing. Training and evaluating the round's model are the flow's (steps.train, steps.evaluate)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.evaluate.generation import ModelRun
from steps.onpolicy.judging import judge_round
from steps.onpolicy.pairs import DEV_FILE, RoundPairs, build_pairs
from steps.onpolicy.prompts import load_round_prompts
from steps.onpolicy.sampling import sample_round

if TYPE_CHECKING:
    from steps.onpolicy.config import OnPolicyConfig

logger = logging.getLogger(__name__)


def round_dir(root: str | Path, round_index: int) -> Path:
    """Where round ``round_index`` keeps its samples, judgements, pairs and stats."""
    return Path(root) / f"round-{round_index:03d}"


def prepare_round(
    policy: str,
    cfg: OnPolicyConfig,
    round_index: int,
    root: str | Path,
    data_dir: str | Path,
    *,
    eval_instructions: Sequence[str] = (),
    judge_options: Mapping[str, Any] | None = None,
    run: ModelRun = ModelRun(),
) -> RoundPairs:
    """The three data phases of round ``round_index`` for ``policy`` (the model the round starts from):
    prompts from ``cfg.prompts`` (``train``: ``data_dir``'s preference train set) minus ``eval_instructions``,
    samples, scores, pairs. Afterwards ``round_dir(root, round_index)`` holds ``preference.train.jsonl`` and a copy
    of ``data_dir``'s ``preference.dev.jsonl`` (when there is one): the data directory of the round's training."""
    where = round_dir(root, round_index)
    prompts, source = load_round_prompts(
        cfg.prompts, data_dir, round_index, cfg.max_prompts, cfg.seed, eval_instructions
    )
    logger.info(
        "round %d: %d prompts from %s (skipped %s)",
        round_index,
        len(prompts),
        source["source"],
        source["skipped"] or "none",
    )
    sample_round(policy, prompts, cfg, round_index, where, run)
    judge_round(where, cfg, judge_options=judge_options, run=run)
    dev = Path(data_dir) / DEV_FILE
    return build_pairs(where, cfg, dev_file=dev if dev.is_file() else None)
