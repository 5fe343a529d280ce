"""Metaflow card components for the training, evaluation and results steps (plots and tables: steps/report)."""

from __future__ import annotations

from datetime import datetime


def training_card(summary: dict | None, variant: str) -> list:
    """The run summary, its curves (the report's plotter) and the final dev metrics."""
    from metaflow.cards import Image, Markdown, Table

    from steps.report.plots import summaries_png

    if not summary:
        return [Markdown("SFT disabled in this config.")]
    parts: list = [
        Markdown(
            f"## {variant}: {summary['kind']} training\n\ninit `{summary['init']}`, reference "
            f"`{summary.get('reference')}`, {summary['steps']} steps in {summary['elapsed_s']:.1f}s "
            f"({summary['tokens_per_s']:.0f} tokens/s); model at `{summary['model_dir']}`"
        )
    ]
    png = summaries_png({variant: summary}, f"{variant} training")
    if png is not None:
        parts.append(Image(png, label=f"training curves of {variant}"))
    dev = summary.get("final_dev") or {}
    if dev:
        parts.append(
            Table(
                [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in dev.items()],
                headers=["dev metric", "value"],
            )
        )
    return parts


def evaluation_card(result: dict) -> list:
    from metaflow.cards import Markdown, Table

    if not result.get("evaluated"):
        return [Markdown(f"Evaluation disabled for {result['variant']}.")]
    keys = [
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
    ]
    parts: list = [
        Markdown(f"## AlpacaEval 2: {result['variant']}"),
        Table([[k, str(result.get(k))] for k in keys], headers=["field", "value"]),
    ]
    samples = result.get("samples") or []
    if samples:
        parts.append(
            Table(
                [
                    [s["instruction"][:200], s["reference"][:300], s["output"][:300], f"{s['preference']:.2f}"]
                    for s in samples
                ],
                headers=["instruction", "reference", "model", "preference"],
            )
        )
    return parts


def results_card(results: list[dict], flow: str, run_id: str, created_at: datetime | None = None) -> list:
    """The report's results table for this run."""
    from metaflow.cards import Markdown

    from steps.report.table import run_results_table

    return [Markdown("## Results\n\n" + run_results_table(results, flow, run_id, created_at))]
