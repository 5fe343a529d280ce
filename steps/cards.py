"""Metaflow card components, every one the flows show: the training, evaluation, results and report steps' cards
(their plots and tables come from steps/report). The README.md written into each model directory (a Hugging Face
model card, shipped with the model) is another product: steps/model_card.py."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steps.evaluate import EvalResult, VariantResult
    from steps.report.generate import ReportPaths
    from steps.results import TrainResult


def training_card(summary: TrainResult | None, variant: str) -> list:
    """The run summary, its curves (the report's plotter) and the final dev metrics."""
    from metaflow.cards import Image, Markdown, Table

    from steps.report.plots import summaries_png
    from steps.report.records import curves_of

    if summary is None:
        return [Markdown("SFT disabled in this config.")]
    parts: list = [
        Markdown(
            f"## {variant}: {summary.kind} training\n\ninit `{summary.init}`, reference "
            f"`{summary.reference}`, {summary.steps} steps in {summary.elapsed_s:.1f}s "
            f"({summary.tokens_per_s:.0f} tokens/s); model at `{summary.model_dir}`"
        )
    ]
    png = summaries_png({variant: curves_of(summary)}, f"{variant} training")
    if png is not None:
        parts.append(Image(png, label=f"training curves of {variant}"))
    dev = summary.final_dev
    if dev:
        parts.append(
            Table(
                [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in dev.items()],
                headers=["dev metric", "value"],
            )
        )
    return parts


#: The evaluate step's card: these metrics.json fields of the result, in this order.
EVALUATION_CARD_FIELDS = (
    "win_rate",
    "standard_error",
    "length_controlled_winrate",
    "lc_standard_error",
    "lc_unavailable_reason",
    "n_total",
    "avg_length",
    "lc_method",
    "judge",
    "eval_set",
    "reference_generator",
    "judge_agreement",
    "judge_tokens",
    "judge_cost_usd",
    "heldout_preference",
)


def evaluation_card(result: EvalResult) -> list:
    """The evaluate step's card: the variant's AlpacaEval 2 numbers, what produced them and its held-out metrics."""
    from metaflow.cards import Markdown, Table

    if not result.evaluated:
        return [Markdown(f"Evaluation disabled for {result.variant}.")]
    metrics = result.metrics()
    return [
        Markdown(f"## AlpacaEval 2: {result.variant}"),
        Table([[k, str(metrics[k])] for k in EVALUATION_CARD_FIELDS], headers=["field", "value"]),
    ]


def results_card(results: list[VariantResult], flow: str, run_id: str, created_at: datetime | None = None) -> list:
    """The report's results table for this run."""
    from metaflow.cards import Markdown

    from steps.report.table import run_results_table

    return [Markdown("## Results\n\n" + run_results_table(results, flow, run_id, created_at))]


def report_card(paths: ReportPaths, run_pathspec: str | None = None) -> list:
    """The report step's card: the results table, the LC WR / WR bars and ``run_pathspec``'s training curves."""
    from metaflow.cards import Image, Markdown

    n_runs = len(paths.runs)
    table = paths.card_markdown or "_No rows._"
    parts: list = [
        Markdown(
            f"## Results report\n\n{n_runs} run{'s' if n_runs != 1 else ''}, {paths.n_rows} models; "
            f"full report with config snapshots in `{paths.readme}`.\n\n" + table
        )
    ]
    if paths.win_rates_png and Path(paths.win_rates_png).is_file():
        parts.append(Image(Path(paths.win_rates_png).read_bytes(), label="LC WR and WR across runs (± 1 s.e.)"))
    if paths.benchmarks_png and Path(paths.benchmarks_png).is_file():
        parts.append(Image(Path(paths.benchmarks_png).read_bytes(), label="Benchmarks across runs (± 1 s.e.)"))
    training = paths.training_pngs.get(run_pathspec) if run_pathspec else None
    if training and Path(training).is_file():
        parts.append(Image(Path(training).read_bytes(), label=f"training curves of {run_pathspec}"))
    return parts
