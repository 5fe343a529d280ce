"""Result rows from Metaflow's run records, one per evaluated model: the values the report prints and exports.

A run's join ``results`` are typed (``steps.evaluate.results.VariantResult``) since the evaluation results were; an
older run's are plain dicts, read by one adapter, :func:`legacy_result_row`, defensively (a missing or malformed
field becomes None, never an error), so reports regenerated from Metaflow's records still show every earlier run."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from steps.evaluate.provenance import Provenance
from steps.evaluate.results import AlpacaEvalResult, HarnessResult, PairedVs, VariantResult, VerifiableResult
from steps.report.records import RunRecord

LOSS_DISPLAY = {
    "sft": "SFT",
    "dpo": "DPO",
    "simpo": "SimPO",
    "orpo": "ORPO",
    "cpo": "CPO",
    "ipo": "IPO",
    "hinge": "Hinge",
    "kto": "KTO",
}

MISSING = "n/a"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ResultRow:
    """One evaluated model of one run, with the values the report prints and exports."""

    flow: str
    run_id: str
    date: str
    variant: str
    loss_function: str
    lc_winrate: float | None
    lc_standard_error: float | None
    winrate: float | None
    standard_error: float | None
    training_config: str  # short text: lr and the loss's knobs
    config_snapshot: str  # path of the YAML snapshot, relative to the report directory
    epoch: int | None
    model_initialization: str
    judge: str | None
    eval_set: str | None
    reference: str | None
    lc_method: str | None
    n: int | None
    avg_length: float | None
    evaluated: bool
    model_dir: str | None  # relative to the run's output root (RunRecord.output_root_name) when under it
    train_steps: int | None
    tags: list[str]
    lc_unavailable_reason: str | None = None
    paired_baseline: str | None = None
    paired_delta_wr: float | None = None
    paired_ci95: list[float] | None = None
    paired_distinguishable: bool | None = None
    paired_is_baseline: bool = False
    heldout_accuracy: float | None = None  # policy log-prob sum of chosen > rejected on the dev pairs
    heldout_accuracy_normalized: float | None = None  # the same on per-token means
    heldout_reward_accuracy: float | None = None  # implicit reward beta*(policy - reference), where a reference exists
    heldout_reward_margin: float | None = None
    judge_agreement: float | None = None  # with the annotations' own judge (e.g. GPT-4-Turbo), when measured
    judge_agreement_text: str | None = None
    judge_tokens: int | None = None
    judge_cost_usd: float | None = None
    n_instructions: int | None = None  # evaluated; ``n`` counts those whose judgement parsed as a preference
    eval_dtype: str | None = None  # the dtype the answers were generated in
    weights_changed_share: float | None = None  # share of weight entries that differ from the init in eval_dtype
    weights_unchanged_reason: str | None = None  # where none differs: the scores are the init's, and why
    # on-policy rounds: the round (1, 2, ...) of variant ``round_of`` whose model this is, and the paired difference
    # from the model the round started from (round r-1; for round 1 its init's row, e.g. SFT)
    round: int | None = None
    round_of: str | None = None
    paired_previous: str | None = None
    paired_previous_delta_wr: float | None = None
    paired_previous_ci95: list[float] | None = None
    paired_previous_distinguishable: bool | None = None
    paired_unavailable_reason: str | None = None  # why a row has no paired difference (e.g. provenance differs)
    # what produced the row (steps.evaluate.provenance.Provenance; None: not recorded), in CSV/JSON only
    alpaca_eval_version: str | None = None
    annotator_config: str | None = None
    annotator_prompt_sha256: str | None = None
    judge_endpoint: str | None = None
    judge_model: str | None = None
    judge_settings: str | None = None
    eval_set_size: int | None = None
    eval_set_sha256: str | None = None
    decoding: dict[str, Any] | None = None
    benchmark_versions: dict[str, Any] | None = None
    software_versions: dict[str, Any] | None = None
    # IFBench (verifiable instruction following, judge-free): accuracies and standard errors in %
    ifbench_prompt_strict: float | None = None
    ifbench_prompt_strict_se: float | None = None
    ifbench_prompt_loose: float | None = None
    ifbench_prompt_loose_se: float | None = None
    ifbench_instruction_strict: float | None = None
    ifbench_instruction_strict_se: float | None = None
    ifbench_instruction_loose: float | None = None
    ifbench_instruction_loose_se: float | None = None
    ifbench_n_prompts: int | None = None
    ifbench_n_prompts_scored: int | None = None  # prompts whose every instruction could be verified offline
    ifbench_n_instructions_unscored: int | None = None
    ifbench_prompt_set: str | None = None  # the first 12 hex digits of the prompt set's sha256
    paired_ifbench_baseline: str | None = None
    paired_delta_ifbench: float | None = None  # prompt-level strict accuracy minus the baseline's, same prompts
    paired_ifbench_ci95: list[float] | None = None
    paired_ifbench_distinguishable: bool | None = None
    paired_ifbench_is_baseline: bool = False
    # lm-evaluation-harness tasks (evaluation.benchmarks): task -> {"metric", "value", "stderr", "percent"}; rates
    # (percent true) in %
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # as the run recorded them, not exported: what the model started from (``model_initialization`` names it after
    # the run's row whose model it is), where the model is, and its training section (the config snapshot's)
    init_spec: str | None = field(default=None, repr=False)
    model_path: str | None = field(default=None, repr=False)
    training_section: Any = field(default=None, repr=False)

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run_id}"


def variant_order(variant: str) -> tuple:
    """SFT first, then losses alphabetically (the pipeline's own order)."""
    return (variant != "sft", variant)


def loss_display(variant: str) -> str:
    return LOSS_DISPLAY.get(variant, variant.upper() if variant else MISSING)


def safe_name(text: str) -> str:
    return _SAFE_NAME.sub("_", text).strip("_") or "x"


def snapshot_name(record: RunRecord, variant: str) -> str:
    """File name of a model's config snapshot: unique per run and variant."""
    return f"{safe_name(record.flow)}-{safe_name(record.run_id)}-{safe_name(variant)}.yaml"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _compact(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def training_config_text(training_config: dict | None) -> str:
    """``lr=5e-06, beta=0.1, nll_scale=0`` from a variant's training section; ``n/a`` when absent."""
    if not training_config:
        return MISSING
    parts = []
    if "lr" in training_config:
        parts.append(f"lr={_compact(training_config['lr'])}")
    knobs = training_config.get("criterion_config") or {}
    if isinstance(knobs, dict):
        parts.extend(f"{k}={_compact(v)}" for k, v in knobs.items() if k != "_type_")
    return ", ".join(parts) or MISSING


def describe_init(init: str | None, rows: list[ResultRow]) -> str:
    """Name where a model started: another model of the same run (``SFT (base)``) or the spec itself."""
    if not init:
        return MISSING
    for other in rows:
        if other.model_path and other.model_path == init:
            parent = loss_display(other.variant)
            return f"{parent} (from {other.init_spec})" if other.init_spec else parent
    return init


def agreement_text(agreement: dict | None) -> str | None:
    """``16/30 (53%; majority 97%, κ 0.07) vs <annotator>`` from a recorded judge agreement."""
    if not agreement or agreement.get("n_compared") is None:
        return None
    text = f"{agreement.get('n_agree')}/{agreement.get('n_compared')}"
    share, majority, kappa = (
        _number(agreement.get(k)) for k in ("agreement", "majority_baseline_agreement", "cohens_kappa")
    )
    details = [
        f"{share:.0%}" if share is not None else None,
        f"majority {majority:.0%}" if majority is not None else None,
        f"κ {kappa:.2f}" if kappa is not None else None,
    ]
    text += f" ({'; '.join(d for d in details if d)})"
    if agreement.get("official_annotator"):
        text += f" vs {agreement['official_annotator']}"
    return text


def _weight_cells(dtype: Any, changed: Any, note: Any, share: Any) -> dict:
    """The dtype answers were generated in, the share of weights that differ from the init in it, and (where none
    does) a sentence saying the scores are the init's and why."""
    reason = f"the scored model equals its initialization in {dtype}: {note}" if changed == 0 and note else None
    return {
        "eval_dtype": dtype if isinstance(dtype, str) else None,
        "weights_changed_share": _number(share),
        "weights_unchanged_reason": reason,
    }


def _judge_cells(agreement: Any, total_tokens: Any, cost_usd: Any) -> dict:
    """The judge's measured agreement (a registry entry, see steps.evaluate.agreement), its tokens and cost."""
    agreement = agreement if isinstance(agreement, dict) else None
    return {
        "judge_agreement": _number(agreement.get("agreement")) if agreement else None,
        "judge_agreement_text": agreement_text(agreement),
        "judge_tokens": _int(total_tokens),
        "judge_cost_usd": _number(cost_usd),
    }


def _paired_cells(baseline: Any, is_baseline: bool, delta: Any, ci: Any, distinguishable: Any, why: Any) -> dict:
    """The paired difference in WR from the baseline row and its interval (none: n/a, and ``why`` where known)."""
    return {
        "paired_baseline": baseline,
        "paired_delta_wr": _number(delta),
        "paired_ci95": [float(x) for x in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
        "paired_distinguishable": distinguishable,
        "paired_is_baseline": is_baseline,
        "paired_unavailable_reason": why if isinstance(why, str) and why else None,
    }


def _typed_paired_cells(paired: PairedVs | None) -> dict:
    if paired is None:
        return _paired_cells(None, False, None, None, None, None)
    numbers = paired.comparison  # steps.evaluate.paired.paired_comparison's
    if numbers is None:
        return _paired_cells(paired.baseline, paired.is_baseline, None, None, None, paired.unavailable)
    delta, ci, distinguishable = numbers["paired_delta_wr"], numbers["paired_ci95"], numbers["distinguishable"]
    return _paired_cells(paired.baseline, paired.is_baseline, delta, ci, distinguishable, paired.unavailable)


#: The row's fields taken from its provenance as they are (``eval_dtype`` comes with the weight cells).
PROVENANCE_CELLS = (
    "alpaca_eval_version",
    "annotator_config",
    "annotator_prompt_sha256",
    "judge_endpoint",
    "judge_model",
    "judge_settings",
    "eval_set_size",
    "eval_set_sha256",
    "decoding",
    "benchmark_versions",
    "software_versions",
)


def _provenance_cells(provenance: Provenance | None) -> dict:
    """What produced the row (all None where it was not recorded)."""
    if provenance is None:
        return dict.fromkeys(PROVENANCE_CELLS)
    return {name: getattr(provenance, name) for name in PROVENANCE_CELLS}


def _previous_round_cells(evaluation: Any, paired: PairedVs | None) -> dict:
    """An on-policy round's cells: its round, its variant and its paired difference from the previous model."""
    cells = _typed_paired_cells(paired)
    return {
        "round": evaluation.round,
        "round_of": evaluation.round_of,
        "paired_previous": cells["paired_baseline"],
        "paired_previous_delta_wr": cells["paired_delta_wr"],
        "paired_previous_ci95": cells["paired_ci95"],
        "paired_previous_distinguishable": cells["paired_distinguishable"],
    }


def _ifbench_cells(result: VerifiableResult | None, paired: PairedVs | None) -> dict:
    """IFBench accuracies with standard errors, scored counts, the prompt set, and the paired Δ (prompt-level
    strict, ``steps.evaluate.verifiable.accuracy.paired_accuracy_delta``'s numbers) from the baseline row."""
    cells: dict[str, Any] = {}
    if result is not None:
        for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
            stats = getattr(result, name)
            cells[f"ifbench_{name}"] = _number(stats.accuracy)
            cells[f"ifbench_{name}_se"] = _number(stats.standard_error)
        cells["ifbench_n_prompts"] = result.n_prompts
        cells["ifbench_n_prompts_scored"] = result.prompt_strict.n_scored
        cells["ifbench_n_instructions_unscored"] = result.instruction_strict.n_unscored
        cells["ifbench_prompt_set"] = str(result.provenance.get("prompt_set_sha256", ""))[:12] or None
    if paired is not None:
        numbers = paired.comparison or {}
        ci = numbers.get("ci95")
        cells.update(
            paired_ifbench_baseline=paired.baseline,
            paired_ifbench_is_baseline=paired.is_baseline,
            paired_delta_ifbench=_number(numbers.get("delta")),
            paired_ifbench_ci95=[float(x) for x in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
            paired_ifbench_distinguishable=numbers.get("distinguishable"),
        )
    return cells


def _benchmark_cells(harness: HarnessResult | None) -> dict:
    """The lm-evaluation-harness scores by task (rates in %)."""
    if harness is None:
        return {}
    scores = {
        s.task: {"metric": s.metric, "value": _number(s.value), "stderr": _number(s.stderr), "percent": s.percent}
        for s in harness.scores
    }
    return {"benchmarks": scores}


def _run_cells(record: RunRecord, variant: str, model_dir: Any, init: Any, training_config: Any) -> dict:
    """The cells a row takes from its run and its training (``model_initialization`` is named by rows_for_run)."""
    return {
        "flow": record.flow,
        "run_id": record.run_id,
        "date": record.date,
        "variant": variant,
        "loss_function": loss_display(variant),
        "training_config": training_config_text(training_config),
        "config_snapshot": f"configs/{snapshot_name(record, variant)}",
        "model_initialization": MISSING,
        "model_dir": record.relative_path(model_dir),
        "tags": list(record.tags),
        "init_spec": init,
        "model_path": model_dir,
        "training_section": training_config,
    }


def _evaluation_cells(evaluated: AlpacaEvalResult | None) -> dict:
    """The AlpacaEval cells of a typed result (all None where the model was not evaluated)."""
    if evaluated is None:
        return {
            **dict.fromkeys(("lc_winrate", "lc_standard_error", "winrate", "standard_error", "judge", "eval_set")),
            **dict.fromkeys(("reference", "lc_method", "n", "n_instructions", "avg_length", "lc_unavailable_reason")),
            **_weight_cells(None, None, None, None),
            **_judge_cells(None, None, None),
            **_provenance_cells(None),
        }
    scores, judge, change = evaluated.scores, evaluated.judge, evaluated.weight_change
    return {
        "lc_winrate": _number(scores.length_controlled_winrate),
        "lc_standard_error": _number(scores.lc_standard_error),
        "winrate": _number(scores.win_rate),
        "standard_error": _number(scores.standard_error),
        "judge": judge.label,
        "eval_set": evaluated.eval_set,
        "reference": evaluated.reference_generator,
        "lc_method": scores.lc_method,
        "n": _int(scores.n_total),
        "n_instructions": _int(evaluated.n_instructions),
        "avg_length": _number(scores.avg_length),
        "lc_unavailable_reason": scores.lc_unavailable_reason,
        **(
            _weight_cells(change.dtype, change.changed, change.note, change.share)
            if change is not None
            else _weight_cells(evaluated.generation["dtype"], None, None, None)
        ),
        **_judge_cells(judge.agreement, judge.tokens["total"], judge.cost_usd),
        **_provenance_cells(evaluated.provenance),
    }


def typed_result_row(record: RunRecord, result: VariantResult) -> ResultRow:
    """A row of a run whose join stored typed results (``steps.evaluate.results.VariantResult``)."""
    trained, heldout, paired = result.evaluation, result.evaluation.heldout, result.paired_vs
    row = ResultRow(
        **_run_cells(record, trained.variant, trained.model_dir, trained.init, result.training_config),
        **_evaluation_cells(trained.alpaca_eval),
        epoch=_int(trained.epoch),
        evaluated=trained.evaluated,
        train_steps=_int(result.train_steps),
        **_typed_paired_cells(paired),
        heldout_accuracy=_number(heldout.preference_accuracy) if heldout else None,
        heldout_accuracy_normalized=_number(heldout.preference_accuracy_normalized) if heldout else None,
        heldout_reward_accuracy=_number(heldout.reward_accuracy) if heldout else None,
        heldout_reward_margin=_number(heldout.reward_margin_mean) if heldout else None,
        **_ifbench_cells(trained.ifbench, result.paired_ifbench),
        **_benchmark_cells(trained.benchmarks),
    )
    if trained.round is None:
        return row
    row.loss_function = loss_display(trained.round_of or "")
    return dataclasses.replace(row, **_previous_round_cells(trained, result.paired_previous))


def legacy_result_row(record: RunRecord, result: Mapping) -> ResultRow:
    """The one adapter of an older run's result, a plain dict (``evaluate_variant``'s row flattened with
    metrics.json, plus the join's training facts and ``paired_vs``), read defensively: what it lacks or holds
    malformed becomes None."""
    variant = str(result.get("variant", ""))
    generation, change = result.get("generation"), result.get("weight_change")
    change = change if isinstance(change, dict) else {}
    heldout, paired = result.get("heldout_preference") or {}, result.get("paired_vs") or {}
    tokens = result.get("judge_tokens")
    return ResultRow(
        **_run_cells(record, variant, result.get("model_dir"), result.get("init"), result.get("training_config")),
        lc_winrate=_number(result.get("length_controlled_winrate")),
        lc_standard_error=_number(result.get("lc_standard_error")),
        winrate=_number(result.get("win_rate")),
        standard_error=_number(result.get("standard_error")),
        epoch=_int(result.get("epoch")),
        judge=result.get("judge"),
        eval_set=result.get("eval_set"),
        reference=result.get("reference_generator"),
        lc_method=result.get("lc_method"),
        n=_int(result.get("n_total")),
        n_instructions=_int(result.get("n_instructions")),
        avg_length=_number(result.get("avg_length")),
        evaluated=bool(result.get("evaluated", "win_rate" in result)),
        train_steps=_int(result.get("train_steps")),
        lc_unavailable_reason=result.get("lc_unavailable_reason"),
        **_paired_cells(
            paired.get("baseline"),
            bool(paired.get("is_baseline")),
            paired.get("paired_delta_wr"),
            paired.get("paired_ci95"),
            paired.get("distinguishable"),
            paired.get("unavailable"),
        ),
        heldout_accuracy=_number(heldout.get("preference_accuracy")),
        heldout_accuracy_normalized=_number(heldout.get("preference_accuracy_normalized")),
        heldout_reward_accuracy=_number(heldout.get("reward_accuracy")),
        heldout_reward_margin=_number(heldout.get("reward_margin_mean")),
        **_weight_cells(
            change.get("dtype") or (generation.get("dtype") if isinstance(generation, dict) else None),
            change.get("changed"),
            change.get("note"),
            change.get("share"),
        ),
        **_judge_cells(
            result.get("judge_agreement"),
            tokens.get("total") if isinstance(tokens, dict) else None,
            result.get("judge_cost_usd"),
        ),
        **_provenance_cells(Provenance.from_dict(result.get("provenance"))),
    )


def rows_for_run(record: RunRecord) -> list[ResultRow]:
    """The run's results as rows, SFT first (typed results as they are, an older run's dicts through
    :func:`legacy_result_row`)."""
    rows = [
        typed_result_row(record, r) if isinstance(r, VariantResult) else legacy_result_row(record, r)
        for r in record.results
    ]
    for row in rows:
        row.model_initialization = describe_init(row.init_spec, rows)
    return sorted(rows, key=lambda row: (variant_order(row.round_of or row.variant), row.round or 0))


def build_rows(records: list[RunRecord]) -> list[ResultRow]:
    """All rows, runs oldest first (the order ``records`` come in), SFT first within a run."""
    return [row for record in records for row in rows_for_run(record)]
