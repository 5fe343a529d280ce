"""Metaflow card components for training, evaluation and results (built here, shown by the flow)."""
from __future__ import annotations

from typing import Optional


def _curve_figure(history: list[dict], dev_history: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "reward_margin", "reward_accuracy") if any(k in h for h in history)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        steps = [h["step"] for h in history if key in h]
        ax.plot(steps, [h[key] for h in history if key in h], label=f"train {key}")
        dev_key = f"dev_{key}"
        dev = [(d["step"], d[dev_key]) for d in dev_history if dev_key in d]
        if dev:
            ax.plot(*zip(*dev), "o--", label=f"dev {key}")
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def training_card(summary: Optional[dict]) -> list:
    from metaflow.cards import Image, Markdown, Table

    if not summary:
        return [Markdown("SFT disabled in this config.")]
    parts = [Markdown(f"## {summary['kind']} training\n\ninit `{summary['init']}`, reference "
                      f"`{summary.get('reference')}`, {summary['steps']} steps in {summary['elapsed_s']:.1f}s "
                      f"({summary['tokens_per_s']:.0f} tokens/s); model at `{summary['model_dir']}`")]
    if summary.get("history"):
        import matplotlib.pyplot as plt

        fig = _curve_figure(summary["history"], summary.get("dev_history", []), summary["kind"])
        parts.append(Image.from_matplotlib(fig))
        plt.close(fig)
    dev = summary.get("final_dev") or {}
    if dev:
        parts.append(Table([[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in dev.items()],
                           headers=["dev metric", "value"]))
    return parts


def evaluation_card(result: dict) -> list:
    from metaflow.cards import Markdown, Table

    if not result.get("evaluated"):
        return [Markdown(f"Evaluation disabled for {result['variant']}.")]
    keys = ["win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error", "n_total",
            "avg_length", "lc_method", "judge", "eval_set", "reference_generator"]
    parts = [Markdown(f"## AlpacaEval 2: {result['variant']}"),
             Table([[k, str(result.get(k))] for k in keys], headers=["field", "value"])]
    samples = result.get("samples") or []
    if samples:
        parts.append(Table([[s["instruction"][:200], s["reference"][:300], s["output"][:300], f"{s['preference']:.2f}"]
                            for s in samples], headers=["instruction", "reference", "model", "preference"]))
    return parts


def results_card(results: list[dict]) -> list:
    from metaflow.cards import Markdown

    from steps.pipeline import format_results_table

    return [Markdown("## Results\n\n" + format_results_table(results))]
