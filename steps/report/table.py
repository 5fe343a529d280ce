"""The results table, one row per model: ``LC WR | WR | Loss Function | Training Config | Epoch |
Model Initialization`` (the recipe's columns, with standard errors), then the paired difference from the baseline,
judge-free held-out accuracy, the judge, its measured agreement and cost. The one formatter of results."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from steps.report.records import RunRecord, Selection

#: Column headers of the Markdown table, in order.
COLUMNS = [
    "LC WR",
    "WR",
    "Loss Function",
    "Training Config",
    "Epoch",
    "Model Initialization",
    "Δ WR vs Baseline [95% CI]",
    "Held-out Pref. Acc.",
    "Judge",
    "Judge Agreement",
    "Judge Tokens / Cost",
    "Eval Set",
    "Reference",
    "LC Method",
    "n",
    "Date",
    "Run",
]

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
    model_dir: str | None
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

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run_id}"


# ----------------------------------------------------------------------------- building rows


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
                avg_length=_number(result.get("avg_length")),
                evaluated=evaluated,
                model_dir=result.get("model_dir"),
                train_steps=_int(result.get("train_steps")),
                tags=list(record.tags),
                lc_unavailable_reason=result.get("lc_unavailable_reason"),
                **_paired(result),
                **_heldout(result),
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


# ----------------------------------------------------------------------------- rendering


def fmt_number(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_with_error(value: float | None, error: float | None) -> str:
    """``45.95 ± 10.25``; the error left out where it is unknown."""
    if value is None:
        return MISSING
    return f"{value:.2f}" if error is None else f"{value:.2f} ± {error:.2f}"


def _cell(value: Any) -> str:
    text = MISSING if value is None or value == "" else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def paired_text(row: ResultRow) -> str:
    """``+2.21 [0.97, 3.47] vs SFT``, ``... : not distinguishable from SFT`` when the interval holds 0."""
    if row.paired_is_baseline:
        return "— (baseline)"
    if row.paired_delta_wr is None or row.paired_ci95 is None:
        return MISSING
    low, high = row.paired_ci95
    baseline = loss_display(row.paired_baseline or "")
    text = f"{row.paired_delta_wr:+.2f} [{low:+.2f}, {high:+.2f}] vs {baseline}"
    return text if row.paired_distinguishable else f"{text}: not distinguishable from {baseline}"


def heldout_text(row: ResultRow) -> str:
    """``0.62 (per token 0.58; reward 0.86, margin 0.31)`` on the dev preference pairs."""
    if row.heldout_accuracy is None:
        return MISSING
    parts = [f"per token {row.heldout_accuracy_normalized:.2f}"] if row.heldout_accuracy_normalized is not None else []
    if row.heldout_reward_accuracy is not None:
        reward = f"reward {row.heldout_reward_accuracy:.2f}"
        if row.heldout_reward_margin is not None:
            reward += f", margin {row.heldout_reward_margin:.3g}"
        parts.append(reward)
    return f"{row.heldout_accuracy:.2f}" + (f" ({'; '.join(parts)})" if parts else "")


def cost_text(row: ResultRow) -> str:
    """``1.2M / $12.06``; ``/ local`` for judges on this machine, ``/ unpriced`` for served models without a price."""
    if row.judge_tokens is None:
        return MISSING
    tokens = row.judge_tokens
    amount = f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens / 1e3:.0f}k" if tokens >= 1e3 else str(tokens)
    if row.judge_cost_usd is not None:
        return f"{amount} / ${row.judge_cost_usd:.2f}"
    return f"{amount} / {'local' if (row.judge or '').startswith('local') else 'unpriced'}"


def lc_reasons(rows: list[ResultRow]) -> list[str]:
    """The distinct reasons LC is not shown, in order of first appearance: the table's footnotes."""
    return list(dict.fromkeys(r.lc_unavailable_reason for r in rows if r.lc_unavailable_reason))


def _row_cells(row: ResultRow, links: bool, reasons: list[str]) -> list[str]:
    config = _cell(row.training_config)
    if links:
        config = f"[{config}]({row.config_snapshot})"
    lc = fmt_with_error(row.lc_winrate, row.lc_standard_error)
    if row.lc_winrate is None and row.lc_unavailable_reason in reasons:
        lc = f"{MISSING} [{reasons.index(row.lc_unavailable_reason) + 1}]"
    return [
        lc,
        fmt_with_error(row.winrate, row.standard_error),
        _cell(row.loss_function),
        config,
        _cell(row.epoch),
        _cell(row.model_initialization),
        _cell(paired_text(row)),
        _cell(heldout_text(row)),
        _cell(row.judge),
        _cell(row.judge_agreement_text or ("not measured" if row.evaluated else None)),
        _cell(cost_text(row)),
        _cell(row.eval_set),
        _cell(row.reference),
        _cell(row.lc_method),
        _cell(row.n),
        _cell(row.date),
        f"`{row.pathspec}`",
    ]


def markdown_table(rows: list[ResultRow], links: bool = True) -> str:
    """The table as GitHub Markdown; Training Config links to the snapshot when ``links``."""
    reasons = lc_reasons(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_row_cells(row, links, reasons)) + " |" for row in rows]
    lines += [""] + [f"[{i}] LC WR n/a: {reason}" for i, reason in enumerate(reasons, 1)] if reasons else []
    return "\n".join(lines) + "\n"


def run_results_table(results: list[dict], flow: str, run_id: str, created_at: datetime | None = None) -> str:
    """The table (no links) of one run's ``results`` artifact, e.g. in the run's own cards and stdout."""
    record = RunRecord(
        flow=flow,
        run_id=str(run_id),
        created_at=created_at or datetime.now(timezone.utc),
        tags=[],
        system_tags=[],
        successful=False,
        results=results,
    )
    return markdown_table(rows_for_run(record), links=False)


def notes(rows: list[ResultRow]) -> list[str]:
    """Caveats the numbers need, derived from the rows themselves."""
    out = []
    judges = sorted({r.judge for r in rows if r.judge})
    if any(j.startswith("local") for j in judges):
        out.append(
            "Rows judged by a local small model (`local_logprob` with SmolLM2-135M by default) are a smoke "
            "test of the evaluation mechanism, not a quality signal; only an AlpacaEval annotator (e.g. "
            "`weighted_alpaca_eval_gpt4_turbo`) or a large local judge gives comparable LC WR / WR."
        )
    if any(r.lc_method and "approximate" in r.lc_method for r in rows):
        out.append(
            "LC WR marked *approximate assets* used reconstructed (not official) `df_gamed.csv` / "
            "`instruction_difficulty.csv`: approximate, within about 1 point of official."
        )
    if any(r.evaluated is False for r in rows):
        out.append("`n/a` in LC WR / WR: the model was trained but not evaluated (evaluation disabled).")
    if any(r.paired_delta_wr is not None for r in rows):
        out.append(
            "Δ WR: the paired difference in win rate from the baseline row on the same instructions, with a "
            "seeded 95 % paired-bootstrap interval; where it contains 0 the two models are not distinguishable."
        )
    if any(r.heldout_accuracy is not None for r in rows):
        out.append(
            "Held-out Pref. Acc.: share of dev preference pairs where the model gives the chosen response a higher "
            "log-probability than the rejected one (summed, and per token), and, where a reference exists, the "
            "implicit reward accuracy and mean margin. No judge involved."
        )
    if any(r.evaluated and r.judge_agreement is None for r in rows):
        out.append(
            "Judge Agreement `not measured`: run `python -m steps.evaluate agreement --judge SPEC --annotations F` "
            "on official annotations to record it; until then the judge's numbers carry no measured reliability."
        )
    return out


def results_markdown(rows: list[ResultRow], selection: Selection, n_runs: int) -> str:
    """``results.md``: a header saying what is covered, the table, and its caveats. No wall-clock time."""
    parts = [
        "# PrefFlow results",
        "",
        f"Generated from Metaflow's records by `python -m steps.report`: {selection.describe()}; "
        f"{n_runs} run{'s' if n_runs != 1 else ''}, {len(rows)} model{'s' if len(rows) != 1 else ''}. "
        "Do not edit: regenerating replaces this file.",
        "",
        "LC WR / WR: AlpacaEval 2 length-controlled and raw win rate (%) against the reference; "
        "Training Config links to the exact config snapshot of the run.",
        "",
    ]
    parts.append(markdown_table(rows) if rows else "_No successful runs match this selection._\n")
    caveats = notes(rows)
    if caveats:
        parts += ["## Notes", ""] + [f"- {c}" for c in caveats] + [""]
    return "\n".join(parts).rstrip("\n") + "\n"


#: CSV/JSON field order: the table's columns first, then the extras.
EXPORT_FIELDS = [
    "lc_winrate",
    "winrate",
    "loss_function",
    "training_config",
    "epoch",
    "model_initialization",
    "judge",
    "eval_set",
    "reference",
    "lc_method",
    "n",
    "date",
    "run_id",
    "flow",
    "lc_standard_error",
    "standard_error",
    "avg_length",
    "variant",
    "evaluated",
    "config_snapshot",
    "model_dir",
    "train_steps",
    "tags",
    "lc_unavailable_reason",
    "paired_baseline",
    "paired_delta_wr",
    "paired_ci95",
    "paired_distinguishable",
    "heldout_accuracy",
    "heldout_accuracy_normalized",
    "heldout_reward_accuracy",
    "heldout_reward_margin",
    "judge_agreement",
    "judge_agreement_text",
    "judge_tokens",
    "judge_cost_usd",
]


def row_dict(row: ResultRow) -> dict:
    data = asdict(row)
    return {k: data[k] for k in EXPORT_FIELDS}


def results_csv(rows: list[ResultRow]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        data = row_dict(row)
        data["tags"] = " ".join(data["tags"])
        writer.writerow({k: "" if v is None else v for k, v in data.items()})
    return buf.getvalue()


def results_json(rows: list[ResultRow], records: list[RunRecord], selection: Selection) -> str:
    doc = {
        "selection": {
            "flow": selection.flow,
            "namespace": selection.namespace,
            "tags": list(selection.tags),
            "latest": selection.latest,
            "include_runs": list(selection.include_runs),
        },
        "runs": [
            {
                "pathspec": r.pathspec,
                "created_at": r.created_at.isoformat(),
                "successful": r.successful,
                "tags": r.tags,
                "system_tags": r.system_tags,
            }
            for r in records
        ],
        "columns": COLUMNS,
        "rows": [row_dict(row) for row in rows],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n"
