"""One on-policy round as the flow's ``onpolicy_round`` step runs it (one Metaflow task per round): sample from
the current policy, judge, pair (steps.onpolicy.rounds), train the variant's loss from the current policy on the
round's pairs, evaluate the round's model as any variant is evaluated. Everything a round writes stays under
``<output root>/<variant>/rounds/round-<r>/``: samples, judgements and their cache, pairs, stats, and the model
(``train/``); a retried or resumed round reuses the data phases already written and training resumes from its
last checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.config.plan import Variant, VariantPlan

if TYPE_CHECKING:
    from steps.evaluate import EvalResult
    from steps.results import TrainResult
    from steps.step_context import StepContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOutcome:
    """What one round left: its number (1-based), the trained model, its evaluation, its ``round_stats.json`` and
    the round's directory (a data directory: ``preference.train.jsonl``, the dev pairs)."""

    round: int
    train: TrainResult
    result: EvalResult
    stats: dict[str, Any]
    round_dir: str


def rounds_root(output_root: str, variant: str) -> Path:
    """Where a variant's rounds live: ``round-001``, ``round-002``, ... below it."""
    return Path(output_root) / variant / "rounds"


def round_name(variant: str, round_number: int) -> str:
    """The round's model name: its evaluation directory, tracking run, Hub repository suffix."""
    return f"{variant}-round-{round_number}"


def round_policy(plan: VariantPlan, previous: list[RoundOutcome], sft: TrainResult | None) -> str:
    """The model round ``len(previous) + 1`` starts from: the previous round's, or for round 1 the variant's
    preference init (``auto``: the SFT model for reference-based losses), as offline training would start."""
    if previous:
        return previous[-1].train.model_dir
    from steps.train.recipes import resolve_init_and_reference

    p = plan.config.preference
    return resolve_init_and_reference(plan.config, plan.loss, p, sft.model_dir if sft else None)[0]


def round_plan(plan: VariantPlan, round_number: int, policy: str, sft: TrainResult | None) -> VariantPlan:
    """The variant's plan for one round: its own name, init = the current policy, and the reference that
    ``on_policy.reference`` names (the round's start or the SFT model; reference-free losses keep theirs)."""
    from steps import losses

    p = plan.config.preference
    changes: dict[str, Any] = {"init": policy}
    if losses.requires_reference(plan.loss) and p.reference != "none":
        changes["reference"] = p.on_policy.reference_for(policy, sft.model_dir if sft else policy)
    config = dataclasses.replace(plan.config, preference=dataclasses.replace(p, **changes))
    name = round_name(plan.name, round_number)
    return VariantPlan(Variant(name, plan.loss, dict(plan.variant.overrides)), config)


def run_round(
    ctx: StepContext,
    plan: VariantPlan,
    previous: list[RoundOutcome],
    data_dir: str,
    sft: TrainResult | None,
    reference_path: str | None,
) -> RoundOutcome:
    """Round ``len(previous) + 1`` of ``plan``'s variant (``ctx.config`` is ``plan.config``)."""
    from steps.evaluate import ModelRun, load_eval_set
    from steps.onpolicy.rounds import prepare_round, round_dir
    from steps.pipeline import evaluate_variant
    from steps.step_context import step_context
    from steps.train.launch import train_on_node

    number = len(previous) + 1
    on, e = plan.config.preference.on_policy, plan.config.evaluation
    policy = round_policy(plan, previous, sft)
    root = rounds_root(ctx.output_root, plan.name)
    where = round_dir(root, number)
    store = ctx.store
    if store is not None:
        store.ensure_all(data_dir, policy, sft.model_dir if sft else None)
    # the eval set's instructions never become training prompts (all of them, not only the scored ones)
    held_out = load_eval_set(e.eval_set).instructions if e.enabled else ()
    logger.info("%s round %d of %d: policy %s -> %s", plan.name, number, on.rounds, policy, where)
    with ctx.heavy_turn(f"{plan.name} round {number}: sample and judge"):
        prepare_round(
            policy,
            on,
            number,
            root,
            data_dir,
            eval_instructions=held_out,
            judge_options=on.judge_options(e.judge_options()),
            run=ModelRun(e.backend, dtype=e.dtype, engine=e.engine),
        )
    if store is not None:
        store.push(where)
    this = round_plan(plan, number, policy, sft)
    this_ctx = step_context(this.config, ctx.output_root, ctx.handoff)
    sft_dir = sft.model_dir if sft else None
    train = train_on_node(
        this_ctx, plan.loss, str(Path(plan.name) / "rounds" / where.name / "train"), str(where), sft_dir
    )
    if train is None:  # one node: this process is global rank 0
        raise RuntimeError(f"{plan.name} round {number}: training returned no result on this node")
    result = evaluate_variant(this_ctx, this, train, reference_path, data_dir)
    init = train.init_label if number == 1 else f"round {number - 1}"
    result = dataclasses.replace(result, init=init, round=number, round_of=plan.name)
    from steps.io import read_json
    from steps.onpolicy.pairs import STATS_FILE

    return RoundOutcome(number, train, result, read_json(where / STATS_FILE), str(where))


def round_card(outcome: RoundOutcome) -> list:
    """The round step's card: what the round sampled, judged, kept and cost, then its training and evaluation."""
    from metaflow.cards import Markdown, Table

    from steps.cards import evaluation_card, training_card

    s = outcome.stats
    tokens = s["tokens"]
    rows: list[list] = [
        ["prompts x samples", f"{s['prompts']} x {s['samples_per_prompt']} = {s['samples']}"],
        [
            "judge",
            f"{s['judge']} ({s['judgements']} judgements: {s['judgements_new']} new, {s['judgements_cached']} cached)",
        ],
        [
            "pairs kept",
            f"{s['pairs_kept']} of {s['candidate_pairs']} ({s['dropped_ties']} ties, "
            f"{s['dropped_small_margin']} under min_margin)",
        ],
        ["tokens generated (answers)", f"{tokens['answers']} ({tokens['answers_per_prompt']:.1f} per prompt)"],
        [
            "tokens judged",
            f"{tokens['judge_prompt'] + tokens['judge_completion']} ({tokens['judged_per_prompt']:.1f} per prompt)",
        ],
        ["seconds", f"sampling {s['seconds']['sampling']:.1f}, judging {s['seconds']['judging']:.1f}"],
    ]
    parts: list = [
        Markdown(
            f"## {outcome.result.round_of}: on-policy round {outcome.round}\n\nfrom `{s['policy']}`; "
            f"data in `{outcome.round_dir}`"
        ),
        Table(rows, headers=["round", "value"]),
    ]
    return parts + training_card(outcome.train, outcome.result.variant) + evaluation_card(outcome.result)
