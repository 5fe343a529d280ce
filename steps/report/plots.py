"""Report plots as PNG bytes: training curves, LC WR / WR bars and per-benchmark accuracy bars (IFBench,
lm-evaluation-harness tasks), all with standard errors.

Agg backend, no timestamp or software tag: the same records give byte-identical files."""

from __future__ import annotations

import io
from typing import Any

from steps.report.records import RunRecord, TrainingCurves
from steps.report.rows import ResultRow, loss_display, variant_order

#: (history key, panel title) of the preference panels, in order.
PREFERENCE_PANELS = [
    ("loss", "preference loss"),
    ("reward_margin", "reward margin"),
    ("reward_accuracy", "reward accuracy"),
]
DPI = 100


def _pyplot() -> Any:  # matplotlib.pyplot, imported on first use and on the Agg backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [
        (h["step"], h[key])
        for h in history
        if isinstance(h, dict) and "step" in h and isinstance(h.get(key), (int, float))
    ]
    return [p[0] for p in points], [p[1] for p in points]


def summary_panels(
    summaries: dict[str, TrainingCurves],
) -> list[tuple[str, str, list[tuple[str, TrainingCurves]]]]:
    """(history key, title, [(label, curves)]) per panel with data, from {variant: its training curves}:
    SFT loss, then preference loss, reward margin and reward accuracy."""
    ordered = sorted(summaries.items(), key=lambda kv: variant_order(kv[0]))
    sft = [(loss_display(v), s) for v, s in ordered if v == "sft" and s.history]
    pref = [(loss_display(v), s) for v, s in ordered if v != "sft" and s.history]
    panels = []
    if sft and any(_series(s.history, "loss")[0] for _, s in sft):
        panels.append(("loss", "SFT loss", sft))
    for key, title in PREFERENCE_PANELS:
        with_data = [(label, s) for label, s in pref if _series(s.history, key)[0]]
        if with_data:
            panels.append((key, title, with_data))
    return panels


def training_panels(record: RunRecord) -> list[tuple[str, str, list[tuple[str, TrainingCurves]]]]:
    return summary_panels(record.training_curves)


def summaries_png(summaries: dict[str, TrainingCurves], title: str) -> bytes | None:
    """One row of panels (see ``summary_panels``): lines per optimizer step, circles on the dev set; None if empty."""
    panels = summary_panels(summaries)
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.3), squeeze=False)
    for ax, (key, panel_title, series) in zip(axes[0], panels):
        for i, (label, summary) in enumerate(series):
            color = f"C{i}"
            xs, ys = _series(summary.history, key)
            ax.plot(xs, ys, color=color, linewidth=1.2, label=f"{label} train")
            dx, dy = _series(summary.dev_history, f"dev_{key}")
            if dx:
                ax.plot(dx, dy, "o--", color=color, markersize=5, linewidth=0.8, label=f"{label} dev")
        if key == "reward_accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(panel_title)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def training_curves_png(record: RunRecord) -> bytes | None:
    """The run's training curves (every variant's summary), titled with the run and its date."""
    return summaries_png(record.training_curves, f"{record.pathspec} ({record.date})")


def win_rate_bars_png(rows: list[ResultRow]) -> bytes | None:
    """Grouped bars per evaluated model: LC WR and WR (%), error bars = one standard error.

    A missing LC WR leaves its bar out and says ``LC n/a``. None when no row has a win rate.
    """
    scored = [r for r in rows if r.winrate is not None or r.lc_winrate is not None]
    if not scored:
        return None
    plt = _pyplot()
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(scored) + 2.0), 4.2))
    xs = list(range(len(scored)))
    for offset, attr, err_attr, label, color in (
        (-width / 2, "lc_winrate", "lc_standard_error", "LC WR", "C0"),
        (width / 2, "winrate", "standard_error", "WR", "C1"),
    ):
        pos = [x + offset for x, r in zip(xs, scored) if getattr(r, attr) is not None]
        vals = [getattr(r, attr) for r in scored if getattr(r, attr) is not None]
        errs = [getattr(r, err_attr) or 0.0 for r in scored if getattr(r, attr) is not None]
        if vals:
            ax.bar(pos, vals, width, yerr=errs, capsize=3, label=label, color=color)
    for x, r in zip(xs, scored):
        if r.lc_winrate is None:
            ax.text(x - width / 2, 1.0, "LC n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.axhline(50.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r.loss_function}\n{r.run_id}" for r in scored], fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("win rate vs reference (%)")
    top = max(
        [
            (getattr(r, a) or 0.0) + (getattr(r, e) or 0.0)
            for r in scored
            for a, e in (("lc_winrate", "lc_standard_error"), ("winrate", "standard_error"))
        ]
        + [50.0]
    )
    return _finished_bars(fig, ax, top, "AlpacaEval 2: LC WR and WR (± 1 s.e.)", legend_size=8)


def _finished_bars(fig: Any, ax: Any, top: float, title: str, legend_size: int) -> bytes:
    """A percentage bar chart's y range (to the highest bar plus its error, at most 100), title, legend and grid."""
    ax.set_ylim(0, min(100.0, top * 1.15 + 1.0))
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def round_series(rows: list[ResultRow]) -> dict[str, list[ResultRow]]:
    """The rows of each on-policy variant of each run, ``<run> <variant>`` -> [its round 1's init row if the run
    has it (round 0), round 1, round 2, ...]."""
    series: dict[str, list[ResultRow]] = {}
    for row in sorted((r for r in rows if r.round is not None), key=lambda r: (r.pathspec, r.round_of, r.round)):
        key = f"{row.run_id} {loss_display(row.round_of or '')}"
        if key not in series:
            start = [
                r for r in rows if r.pathspec == row.pathspec and r.round is None and r.variant == row.paired_previous
            ]
            series[key] = start if row.round == 1 else []
        series[key].append(row)
    return series


def win_rate_by_round_png(rows: list[ResultRow]) -> bytes | None:
    """WR (and LC WR where scored) of each on-policy variant by round, round 0 its starting model, error bars one
    standard error; None when no row is a round."""
    series = round_series(rows)
    if not series:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for i, (label, members) in enumerate(series.items()):
        for attr, err, style, name in (
            ("winrate", "standard_error", "o-", "WR"),
            ("lc_winrate", "lc_standard_error", "s--", "LC WR"),
        ):
            points = [
                (r.round or 0, getattr(r, attr), getattr(r, err) or 0.0)
                for r in members
                if getattr(r, attr) is not None
            ]
            if points:
                xs, ys, es = zip(*points)
                ax.errorbar(xs, ys, yerr=es, fmt=style, color=f"C{i}", capsize=3, label=f"{label} {name}")
    ax.axhline(50.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("round (0: the model round 1 started from)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("win rate vs reference (%)")
    ax.set_title("AlpacaEval 2 win rate by on-policy round (± 1 s.e.)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


#: IFBench's accuracies in the benchmark chart: (label, ResultRow attribute; its s.e. is ``<attribute>_se``).
IFBENCH_BARS = [
    ("IFBench\nprompt strict", "ifbench_prompt_strict"),
    ("IFBench\nprompt loose", "ifbench_prompt_loose"),
    ("IFBench\ninstr. strict", "ifbench_instruction_strict"),
    ("IFBench\ninstr. loose", "ifbench_instruction_loose"),
]


def benchmark_values(row: ResultRow) -> dict[str, tuple[float, float]]:
    """{benchmark label: (score %, s.e. %)} of one row: IFBench's four accuracies, then its lm-eval tasks whose
    headline metric is a rate (others have no common scale)."""
    out: dict[str, tuple[float, float]] = {}
    for label, attr in IFBENCH_BARS:
        value = getattr(row, attr)
        if value is not None:
            out[label] = (value, getattr(row, f"{attr}_se") or 0.0)
    for task, score in row.benchmarks.items():
        if score.get("percent") and score.get("value") is not None:
            out[task] = (score["value"], score.get("stderr") or 0.0)
    return out


def benchmark_bars_png(rows: list[ResultRow]) -> bytes | None:
    """Grouped bars per benchmark (IFBench accuracies, lm-eval rates), one bar per model, error bars one standard
    error. None when no row has a benchmark score."""
    values = [(r, benchmark_values(r)) for r in rows]
    values = [(r, v) for r, v in values if v]
    if not values:
        return None
    labels = list(dict.fromkeys(label for _, v in values for label in v))
    plt = _pyplot()
    width = 0.8 / len(values)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 2.0), 4.2))
    top = 0.0
    for i, (row, scores) in enumerate(values):
        xs = [j + (i - (len(values) - 1) / 2) * width for j, label in enumerate(labels) if label in scores]
        vals = [scores[label][0] for label in labels if label in scores]
        errs = [scores[label][1] for label in labels if label in scores]
        ax.bar(xs, vals, width, yerr=errs, capsize=3, label=f"{row.loss_function} {row.run_id}", color=f"C{i % 10}")
        top = max([top] + [v + e for v, e in zip(vals, errs)])
    ax.set_xticks(list(range(len(labels))))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("accuracy (%)")
    return _finished_bars(fig, ax, top, "Benchmarks: accuracy (± 1 s.e.)", legend_size=7)
