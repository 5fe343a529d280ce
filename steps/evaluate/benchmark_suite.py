"""The evaluations beside AlpacaEval, run on every evaluated model by the evaluate step: IFBench (verifiable
instruction following, ``evaluation.ifbench``) and the lm-evaluation-harness tasks of ``evaluation.benchmarks``,
both with the AlpacaEval answers' generation settings and dtype."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from steps.evaluate.ifbench_eval import evaluate_ifbench
from steps.evaluate.results import BenchmarkScore, HarnessResult, VerifiableResult

if TYPE_CHECKING:
    from steps.config import EvaluationConfig
    from steps.evaluate.evaluation import EvalContext

logger = logging.getLogger(__name__)

#: Where the lm-evaluation-harness files go, under the model's evaluation directory.
HARNESS_DIR = "benchmarks"


def evaluate_benchmarks(
    model_spec: str, settings: EvaluationConfig, context: EvalContext
) -> tuple[VerifiableResult | None, HarnessResult | None]:
    """IFBench (None where ``settings.ifbench.enabled`` is off) and the lm-eval tasks (None where
    ``settings.benchmarks`` is empty) for ``model_spec``; files under ``context.out_dir``."""
    ifbench = None
    if settings.ifbench.enabled:
        ifbench = evaluate_ifbench(model_spec, settings.ifbench.limit, settings.generation, context)
        gc.collect()
    harness = None
    if settings.benchmarks:
        harness = run_harness(model_spec, settings, context)
        gc.collect()
    return ifbench, harness


def run_harness(model_spec: str, settings: EvaluationConfig, context: EvalContext) -> HarnessResult:
    """``settings.benchmarks`` through ``steps.evaluate.harness.run_benchmarks`` (same dtype, device and sampling
    as the AlpacaEval answers), typed."""
    from steps.evaluate.harness import SUMMARY_FILE, run_benchmarks

    out_dir = Path(context.out_dir) / HARNESS_DIR
    summary = run_benchmarks(model_spec, settings.benchmarks, settings.generation, out_dir, context.run)
    return HarnessResult(
        scores=tuple(BenchmarkScore.of(entry) for entry in summary["benchmarks"].values()),
        lm_eval_version=str(summary["lm_eval_version"]),
        dtype=str(summary["dtype"]),
        device=str(summary["device"]),
        summary_file=str(out_dir / SUMMARY_FILE),
    )
