"""The results table, one row per model: ``LC WR | WR | Loss Function | Training Config | Epoch |
Model Initialization`` (the recipe's columns, with standard errors), then the paired difference from the baseline,
judge-free held-out accuracy, the judge, its measured agreement and cost, the run; then IFBench accuracy and its
paired difference from the baseline, and one column per lm-evaluation-harness task. The one formatter of results."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from steps.report.records import RunRecord, Selection
from steps.report.rows import (
    MISSING,
    PROVENANCE_CELLS,
    ResultRow,
    build_rows,
    loss_display,
    rows_for_run,
    safe_name,
    snapshot_name,
)
from steps.report.views import group_rows

if TYPE_CHECKING:
    from steps.evaluate.results import VariantResult

# rows.py builds the rows; ResultRow, build_rows, safe_name and snapshot_name are still importable from here
__all__ = [
    "COLUMNS",
    "EXPORT_FIELDS",
    "ROUND_COLUMNS",
    "ROUND_FIELDS",
    "ResultRow",
    "benchmark_tasks",
    "build_rows",
    "cost_text",
    "export_fields",
    "fmt_number",
    "fmt_with_error",
    "heldout_text",
    "ifbench_text",
    "lc_reasons",
    "markdown_table",
    "notes",
    "paired_ifbench_text",
    "paired_reasons",
    "paired_text",
    "results_csv",
    "results_json",
    "results_markdown",
    "row_dict",
    "run_results_table",
    "safe_name",
    "snapshot_name",
    "table_columns",
    "unchanged_reasons",
]

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
    "IFBench (strict, prompt) ± s.e.",
    "Δ IFBench vs Baseline [95% CI]",
]
#: Header of an lm-evaluation-harness task's column (appended after COLUMNS for the tasks any row has).
BENCHMARK_COLUMN = "{task} ± s.e."


#: Added at the end of the table, and of the CSV/JSON fields, when a row is an on-policy round.
ROUND_COLUMNS = ["Round", "Δ WR vs Previous Round [95% CI]"]
ROUND_FIELDS = [
    "round",
    "round_of",
    "paired_previous",
    "paired_previous_delta_wr",
    "paired_previous_ci95",
    "paired_previous_distinguishable",
]


def has_rounds(rows: Sequence[ResultRow]) -> bool:
    return any(r.round is not None for r in rows)


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


def _paired_delta_text(
    is_baseline: bool, delta: float | None, ci: list[float] | None, distinguishable: bool | None, baseline: str | None
) -> str:
    if is_baseline:
        return "— (baseline)"
    if delta is None or ci is None:
        return MISSING
    low, high = ci
    name = loss_display(baseline or "")
    text = f"{delta:+.2f} [{low:+.2f}, {high:+.2f}] vs {name}"
    return text if distinguishable else f"{text}: not distinguishable from {name}"


def paired_text(row: ResultRow) -> str:
    """``+2.21 [0.97, 3.47] vs SFT``, ``... : not distinguishable from SFT`` when the interval holds 0."""
    return _paired_delta_text(
        row.paired_is_baseline, row.paired_delta_wr, row.paired_ci95, row.paired_distinguishable, row.paired_baseline
    )


def paired_ifbench_text(row: ResultRow) -> str:
    """The paired Δ of IFBench prompt-level strict accuracy from the baseline row, as :func:`paired_text`."""
    return _paired_delta_text(
        row.paired_ifbench_is_baseline,
        row.paired_delta_ifbench,
        row.paired_ifbench_ci95,
        row.paired_ifbench_distinguishable,
        row.paired_ifbench_baseline,
    )


def ifbench_text(row: ResultRow) -> str:
    """``12.28 ± 4.35``; ``(48/57 scored)`` added where some prompts could not be verified offline."""
    text = fmt_with_error(row.ifbench_prompt_strict, row.ifbench_prompt_strict_se)
    scored, total = row.ifbench_n_prompts_scored, row.ifbench_n_prompts
    if row.ifbench_prompt_strict is not None and scored is not None and total is not None and scored < total:
        text += f" ({scored}/{total} scored)"
    return text


def benchmark_tasks(rows: Sequence[ResultRow]) -> list[str]:
    """The lm-evaluation-harness tasks any row has, in order of first appearance: one column each."""
    return list(dict.fromkeys(task for row in rows for task in row.benchmarks))


def table_columns(rows: Sequence[ResultRow]) -> list[str]:
    """COLUMNS, one column per lm-evaluation-harness task of ``rows``, then the round columns where a row is a round."""
    tasks = [BENCHMARK_COLUMN.format(task=task) for task in benchmark_tasks(rows)]
    return COLUMNS + tasks + (ROUND_COLUMNS if has_rounds(rows) else [])


def benchmark_text(row: ResultRow, task: str) -> str:
    """``45.20 ± 0.40`` (rates in %); n/a where the row did not run the task."""
    score = row.benchmarks.get(task)
    return MISSING if score is None else fmt_with_error(score.get("value"), score.get("stderr"))


def previous_round_text(row: ResultRow) -> str:
    """``+1.20 [-0.40, +2.80] vs round 1: not distinguishable``; round 1 is compared with its init's row."""
    if row.round is None or row.paired_previous_delta_wr is None or row.paired_previous_ci95 is None:
        return MISSING
    low, high = row.paired_previous_ci95
    before = f"round {row.round - 1}" if row.round > 1 else loss_display(row.paired_previous or "")
    text = f"{row.paired_previous_delta_wr:+.2f} [{low:+.2f}, {high:+.2f}] vs {before}"
    return text if row.paired_previous_distinguishable else f"{text}: not distinguishable"


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


def n_text(row: ResultRow) -> str:
    """``24``; ``23 of 24 judged`` when some judgements did not parse (WR and LC count only the judged ones)."""
    if row.n is not None and row.n_instructions is not None and row.n < row.n_instructions:
        return f"{row.n} of {row.n_instructions} judged"
    return _cell(row.n)


def lc_reasons(rows: list[ResultRow]) -> list[str]:
    """The distinct reasons LC is not shown, in order of first appearance: the table's footnotes."""
    return list(dict.fromkeys(r.lc_unavailable_reason for r in rows if r.lc_unavailable_reason))


def unchanged_reasons(rows: list[ResultRow]) -> list[str]:
    """The distinct reasons a scored model equals its init in the evaluation dtype: footnotes [a], [b], ..."""
    return list(dict.fromkeys(r.weights_unchanged_reason for r in rows if r.weights_unchanged_reason))


def paired_reasons(rows: list[ResultRow]) -> list[str]:
    """The distinct reasons a row has no paired difference (e.g. its provenance differs from the baseline's):
    footnotes [p1], [p2], ..."""
    return list(
        dict.fromkeys(r.paired_unavailable_reason for r in rows if r.paired_unavailable_reason and not r.paired_ci95)
    )


def _letter(index: int) -> str:
    return chr(ord("a") + index) if index < 26 else str(index + 1)


def _row_cells(
    row: ResultRow,
    links: bool,
    reasons: list[str],
    unchanged: list[str],
    unpaired: list[str],
    tasks: Sequence[str] = (),
) -> list[str]:
    config = _cell(row.training_config)
    if links:
        config = f"[{config}]({row.config_snapshot})"
    lc = fmt_with_error(row.lc_winrate, row.lc_standard_error)
    if row.lc_winrate is None and row.lc_unavailable_reason in reasons:
        lc = f"{MISSING} [{reasons.index(row.lc_unavailable_reason) + 1}]"
    wr = fmt_with_error(row.winrate, row.standard_error)
    if row.weights_unchanged_reason in unchanged:
        wr += f" [{_letter(unchanged.index(row.weights_unchanged_reason))}]"
    paired = paired_text(row)
    if row.paired_unavailable_reason in unpaired and paired == MISSING:
        paired += f" [p{unpaired.index(row.paired_unavailable_reason) + 1}]"
    return [
        lc,
        wr,
        _cell(row.loss_function),
        config,
        _cell(row.epoch),
        _cell(row.model_initialization),
        _cell(paired),
        _cell(heldout_text(row)),
        _cell(row.judge),
        _cell(row.judge_agreement_text or ("not measured" if row.evaluated else None)),
        _cell(cost_text(row)),
        _cell(row.eval_set),
        _cell(row.reference),
        _cell(row.lc_method),
        n_text(row),
        _cell(row.date),
        f"`{row.pathspec}`",
        _cell(ifbench_text(row)),
        _cell(paired_ifbench_text(row)),
        *(_cell(benchmark_text(row, task)) for task in tasks),
    ]


def markdown_table(rows: list[ResultRow], links: bool = True) -> str:
    """The table as GitHub Markdown; Training Config links to the snapshot when ``links``."""
    reasons, unchanged, unpaired = lc_reasons(rows), unchanged_reasons(rows), paired_reasons(rows)
    tasks, rounds = benchmark_tasks(rows), has_rounds(rows)
    columns = table_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = _row_cells(row, links, reasons, unchanged, unpaired, tasks)
        cells += [_cell(row.round), _cell(previous_round_text(row))] if rounds else []
        lines.append("| " + " | ".join(cells) + " |")
    footnotes = [f"[{i}] LC WR n/a: {reason}" for i, reason in enumerate(reasons, 1)]
    footnotes += [f"[{_letter(i)}] LC WR / WR: {reason}" for i, reason in enumerate(unchanged)]
    footnotes += [f"[p{i}] Δ WR n/a: {_cell(reason)}" for i, reason in enumerate(unpaired, 1)]
    lines += [""] + footnotes if footnotes else []
    return "\n".join(lines) + "\n"


def run_results_table(
    results: Sequence[VariantResult | Mapping], flow: str, run_id: str, created_at: datetime | None = None
) -> str:
    """The table (no links) of one run's ``results`` artifact, e.g. in the run's own cards and stdout."""
    record = RunRecord(
        flow=flow,
        run_id=str(run_id),
        created_at=created_at or datetime.now(timezone.utc),
        tags=[],
        system_tags=[],
        successful=False,
        results=list(results),
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
    if has_rounds(rows):
        out.append(
            "Round: the model of on-policy round r (trained on pairs its round r-1 model sampled and the judge "
            "ranked; round 1 starts from its Model Initialization). Δ WR vs Previous Round: paired, on the same "
            "instructions, against the model the round started from."
        )
    if any(r.heldout_accuracy is not None for r in rows):
        out.append(
            "Held-out Pref. Acc.: share of dev preference pairs where the model gives the chosen response a higher "
            "log-probability than the rejected one (summed, and per token), and, where a reference exists, the "
            "implicit reward accuracy and mean margin. No judge involved."
        )
    if any(r.ifbench_prompt_strict is not None for r in rows):
        out.append(
            "IFBench (strict, prompt): share (%) of IFBench prompts whose every instruction the model followed, "
            "checked by the package's own verifiers (no judge), ± one standard error; `(k/n scored)`: prompts with "
            "an instruction that cannot be verified offline (missing NLTK data) are left out, never guessed. "
            "Answers use the AlpacaEval generation settings (e.g. max_new_tokens), so length instructions can fail "
            "for that reason. Δ IFBench: the paired difference from the baseline row on the same prompts, with the "
            "same seeded 95 % paired-bootstrap interval as Δ WR."
        )
    if any(r.benchmarks for r in rows):
        out.append(
            "`<task> ± s.e.` columns: lm-evaluation-harness tasks (`evaluation.benchmarks`), headline metric in % for "
            "rates, same generation settings and dtype as the AlpacaEval answers."
        )
    if any(r.evaluated and r.judge_agreement is None for r in rows):
        out.append(
            "Judge Agreement `not measured`: run `python -m steps.evaluate agreement --judge SPEC --annotations F` "
            "on official annotations to record it; until then the judge's numbers carry no measured reliability."
        )
    return out


def generated_from(selection: Selection) -> str:
    """The opening words of every report page: what made it and which runs it covers."""
    return f"Generated from Metaflow's records by `python -m steps.report`: {selection.describe()}"


def table_or_none(rows: list[ResultRow], group_by: str | None = None) -> str:
    """The linked table (one per value of ``group_by``, where given), or a line saying that no run matched."""
    if not rows:
        return "_No successful runs match this selection._\n"
    if group_by is None:
        return markdown_table(rows)
    sections = [
        f"### `{group_by}` = {_cell(value)} ({len(group)} model{'s' if len(group) != 1 else ''})\n\n"
        + markdown_table(group)
        for value, group in group_rows(rows, group_by)
    ]
    return "\n".join(sections)


def notes_section(rows: list[ResultRow]) -> list[str]:
    """``## Notes`` with the caveats the rows need, as lines; none where there is nothing to say."""
    caveats = notes(rows)
    return ["## Notes", "", *(f"- {c}" for c in caveats), ""] if caveats else []


def markdown_page(parts: list[str]) -> str:
    """Lines joined into one page ending in exactly one newline."""
    return "\n".join(parts).rstrip("\n") + "\n"


def results_markdown(rows: list[ResultRow], selection: Selection, n_runs: int) -> str:
    """``results.md``: a header saying what is covered, the table, and its caveats. No wall-clock time."""
    parts = [
        "# PrefFlow results",
        "",
        f"{generated_from(selection)}; "
        f"{n_runs} run{'s' if n_runs != 1 else ''}, {len(rows)} model{'s' if len(rows) != 1 else ''}. "
        "Do not edit: regenerating replaces this file.",
        "",
        "LC WR / WR: AlpacaEval 2 length-controlled and raw win rate (%) against the reference; "
        "Training Config links to the exact config snapshot of the run.",
        "",
        table_or_none(rows, selection.group_by),
        *notes_section(rows),
    ]
    return markdown_page(parts)


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
    "n_instructions",
    "eval_dtype",
    "weights_changed_share",
    "weights_unchanged_reason",
    "paired_unavailable_reason",
    *PROVENANCE_CELLS,
    "ifbench_prompt_strict",
    "ifbench_prompt_strict_se",
    "ifbench_prompt_loose",
    "ifbench_prompt_loose_se",
    "ifbench_instruction_strict",
    "ifbench_instruction_strict_se",
    "ifbench_instruction_loose",
    "ifbench_instruction_loose_se",
    "ifbench_n_prompts",
    "ifbench_n_prompts_scored",
    "ifbench_n_instructions_unscored",
    "ifbench_prompt_set",
    "paired_ifbench_baseline",
    "paired_delta_ifbench",
    "paired_ifbench_ci95",
    "paired_ifbench_distinguishable",
]
#: CSV/JSON fields of an lm-evaluation-harness task (after EXPORT_FIELDS, for the tasks any row has).
BENCHMARK_FIELDS = ("lm_eval_{task}", "lm_eval_{task}_se")


def export_fields(rows: Sequence[ResultRow]) -> list[str]:
    """The CSV/JSON fields of these rows: EXPORT_FIELDS, ROUND_FIELDS where a row is an on-policy round, then each
    lm-evaluation-harness task's score and standard error."""
    return _own_fields(rows) + [f.format(task=task) for task in benchmark_tasks(rows) for f in BENCHMARK_FIELDS]


def _own_fields(rows: Sequence[ResultRow]) -> list[str]:
    return EXPORT_FIELDS + ROUND_FIELDS if has_rounds(rows) else EXPORT_FIELDS


def row_dict(row: ResultRow, fields: Sequence[str] = EXPORT_FIELDS, tasks: Sequence[str] = ()) -> dict:
    data = asdict(row)
    out = {k: data[k] for k in fields}
    for task in tasks:
        score = row.benchmarks.get(task) or {}
        value, stderr = (BENCHMARK_FIELDS[0].format(task=task), BENCHMARK_FIELDS[1].format(task=task))
        out[value], out[stderr] = score.get("value"), score.get("stderr")
    return out


def _csv_value(value: Any) -> Any:
    """A CSV cell: empty for None, JSON for a mapping (decoding settings, package versions), else the value."""
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value


def results_csv(rows: list[ResultRow]) -> str:
    buf = io.StringIO()
    tasks = benchmark_tasks(rows)
    writer = csv.DictWriter(buf, fieldnames=export_fields(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        data = row_dict(row, _own_fields(rows), tasks)
        data["tags"] = " ".join(data["tags"])
        writer.writerow({k: _csv_value(v) for k, v in data.items()})
    return buf.getvalue()


def results_json(rows: list[ResultRow], records: list[RunRecord], selection: Selection) -> str:
    doc = {
        "selection": {
            "flow": selection.flow,
            "namespace": selection.namespace,
            "tags": list(selection.tags),
            "latest": selection.latest,
            "include_runs": list(selection.include_runs),
            "row_filters": list(selection.row_filters),
            "group_by": selection.group_by,
        },
        "runs": [
            {
                "pathspec": r.pathspec,
                "output_root": r.output_root_name,  # the rows' model_dir are relative to it
                "created_at": r.created_at.isoformat(),
                "successful": r.successful,
                "tags": r.tags,
                "system_tags": r.system_tags,
            }
            for r in records
        ],
        "columns": table_columns(rows),
        "rows": [row_dict(row, _own_fields(rows), benchmark_tasks(rows)) for row in rows],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n"
