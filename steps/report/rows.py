"""Result rows from Metaflow's run records, one per evaluated model: the values the report prints and exports,
read defensively (a missing or malformed field becomes None, never an error)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from steps.report.records import RunRecord

LOSS_DISPLAY = {
    "sft": "SFT",
    "dpo": "DPO",
    "simpo": "SimPO",
    "orpo": "ORPO",
    "cpo": "CPO",
    "ipo": "IPO",
    "hinge": "Hinge",
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


def describe_init(init: str | None, record: RunRecord) -> str:
    """Name where a model started: another model of the same run (``SFT (base)``) or the spec itself."""
    if not init:
        return MISSING
    for other in record.results:
        if other.get("model_dir") and other.get("model_dir") == init:
            parent = loss_display(str(other.get("variant", "")))
            start = other.get("init")
            return f"{parent} (from {start})" if start else parent
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


def _paired(result: dict) -> dict:
    paired = result.get("paired_vs") or {}
    ci = paired.get("paired_ci95")
    return {
        "paired_baseline": paired.get("baseline"),
        "paired_delta_wr": _number(paired.get("paired_delta_wr")),
        "paired_ci95": [float(x) for x in ci] if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
        "paired_distinguishable": paired.get("distinguishable") if paired else None,
        "paired_is_baseline": bool(paired.get("is_baseline")),
    }


def _heldout(result: dict) -> dict:
    heldout = result.get("heldout_preference") or {}
    return {
        "heldout_accuracy": _number(heldout.get("preference_accuracy")),
        "heldout_accuracy_normalized": _number(heldout.get("preference_accuracy_normalized")),
        "heldout_reward_accuracy": _number(heldout.get("reward_accuracy")),
        "heldout_reward_margin": _number(heldout.get("reward_margin_mean")),
    }


def _weights(result: dict) -> dict:
    """The dtype answers were generated in, the share of weights that differ from the init in it, and (where none
    does) a sentence saying the scores are the init's and why."""
    change = result.get("weight_change")
    change = change if isinstance(change, dict) else {}
    generation = result.get("generation")
    dtype = change.get("dtype") or (generation.get("dtype") if isinstance(generation, dict) else None)
    reason = None
    if change.get("changed") == 0 and change.get("note"):
        reason = f"the scored model equals its initialization in {dtype}: {change['note']}"
    return {
        "eval_dtype": dtype if isinstance(dtype, str) else None,
        "weights_changed_share": _number(change.get("share")),
        "weights_unchanged_reason": reason,
    }


def rows_for_run(record: RunRecord) -> list[ResultRow]:
    """The run's results as rows, SFT first."""
    rows = []
    for result in sorted(record.results, key=lambda r: variant_order(str(r.get("variant", "")))):
        variant = str(result.get("variant", ""))
        evaluated = bool(result.get("evaluated", "win_rate" in result))
        agreement, tokens = result.get("judge_agreement"), result.get("judge_tokens")
        agreement = agreement if isinstance(agreement, dict) else None
        tokens = tokens if isinstance(tokens, dict) else {}
        rows.append(
            ResultRow(
                flow=record.flow,
                run_id=record.run_id,
                date=record.date,
                variant=variant,
                loss_function=loss_display(variant),
                lc_winrate=_number(result.get("length_controlled_winrate")),
                lc_standard_error=_number(result.get("lc_standard_error")),
                winrate=_number(result.get("win_rate")),
                standard_error=_number(result.get("standard_error")),
                training_config=training_config_text(result.get("training_config")),
                config_snapshot=f"configs/{snapshot_name(record, variant)}",
                epoch=_int(result.get("epoch")),
                model_initialization=describe_init(result.get("init"), record),
                judge=result.get("judge"),
                eval_set=result.get("eval_set"),
                reference=result.get("reference_generator"),
                lc_method=result.get("lc_method"),
                n=_int(result.get("n_total")),
                n_instructions=_int(result.get("n_instructions")),
                avg_length=_number(result.get("avg_length")),
                evaluated=evaluated,
                model_dir=record.relative_path(result.get("model_dir")),
                train_steps=_int(result.get("train_steps")),
                tags=list(record.tags),
                lc_unavailable_reason=result.get("lc_unavailable_reason"),
                **_paired(result),
                **_heldout(result),
                **_weights(result),
                judge_agreement=_number(agreement.get("agreement")) if agreement else None,
                judge_agreement_text=agreement_text(agreement),
                judge_tokens=_int(tokens.get("total")),
                judge_cost_usd=_number(result.get("judge_cost_usd")),
            )
        )
    return rows


def build_rows(records: list[RunRecord]) -> list[ResultRow]:
    """All rows, runs oldest first (the order ``records`` come in), SFT first within a run."""
    return [row for record in records for row in rows_for_run(record)]
