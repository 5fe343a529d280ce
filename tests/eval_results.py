"""Typed evaluation results for tests (steps/evaluate/results.py): a step's EvalResult and a join row around an
AlpacaEvalResult, and the plain dict an older run's join stored for the same model (the report's legacy input)."""

from __future__ import annotations

import dataclasses
from typing import Any

from steps.evaluate.provenance import Provenance
from steps.evaluate.results import (
    AlpacaEvalResult,
    EvalFiles,
    EvalResult,
    HeldoutPreference,
    JudgeRecord,
    PairedVs,
    VariantResult,
    WinRates,
)


def provenance(**changes: Any) -> Provenance:
    """A hand-made provenance of a row judged locally by ``tiny`` on the embedded set (``changes`` replace fields)."""
    recorded = Provenance(
        alpaca_eval_version="0.6.6",
        annotator_config="weighted_alpaca_eval_gpt4_turbo",
        annotator_prompt_sha256="ab" * 32,
        judge_endpoint="local",
        judge_model="tiny",
        judge_settings="local_logprob:tiny|template=weighted_alpaca_eval_gpt4_turbo|max_output_chars=300",
        eval_set="prefflow_embedded",
        eval_set_size=24,
        eval_set_sha256="cd" * 32,
        decoding={"max_new_tokens": 64, "temperature": 0.9, "top_p": 1.0, "seed": 1814, "backend": "hf"},
        eval_dtype="float32",
        benchmark_versions={"lm_eval": "0.4.13"},
        software_versions={"prefflow": "0.1.0", "transformers": "5.25.0", "torch": "2.13.0+cpu"},
    )
    return dataclasses.replace(recorded, **changes)


def alpaca_eval_result(
    annotations: str = "annotations.json",
    judge: str = "local_logprob:tiny",
    provenance: Provenance | None = None,
    **scores: Any,
):
    """A hand-made AlpacaEval 2 evaluation of 24 instructions (``scores`` replace WinRates fields), recorded with
    ``provenance`` (None: as a row evaluated before provenance was recorded)."""
    rates = WinRates(
        win_rate=45.41,
        standard_error=3.125,
        n_wins=11,
        n_wins_base=13,
        n_draws=0,
        n_total=24,
        discrete_win_rate=45.83,
        avg_length=180,
        lc_method="length_controlled_v1_subset_no_gamed_regularisation_no_instruction_difficulty",
        lc_assets=None,
        lc_approximate_assets=False,
        length_controlled_winrate=None,
        lc_standard_error=None,
        lc_unavailable_reason="24 judged instructions; the length-controlled GLM needs at least 50",
    )
    weak = judge.startswith("local")
    return AlpacaEvalResult(
        model="/runs/m",
        generator="prefflow-dpo-1",
        scores=dataclasses.replace(rates, **scores),
        judge=JudgeRecord(judge, weak, {"judge_max_chars": 300}, None, _tokens(2400), None, None, "local judge"),
        weight_change=None,
        eval_set="prefflow_embedded",
        eval_set_source="embedded",
        subset=True,
        n_instructions=24,
        reference_generator="reference:tiny",
        generation={"max_new_tokens": 64, "temperature": 0.9, "dtype": "float32"},
        files=EvalFiles("model_outputs.json", annotations, "metrics.json"),
        provenance=provenance,
    )


def _tokens(total: int) -> dict[str, int]:
    return {"prompt": total, "completion": 0, "total": total, "n_judgements": 24, "n_without_counts": 0}


def heldout(accuracy: float = 0.625, reward_accuracy: float | None = 0.875) -> HeldoutPreference:
    return HeldoutPreference(
        model="/runs/m",
        reference="/runs/sft" if reward_accuracy is not None else None,
        beta=0.1 if reward_accuracy is not None else None,
        n_rows=8,
        n_pairs=8,
        n_dropped_overlength=0,
        n_truncated=1,
        max_seq_len=384,
        preference_accuracy=accuracy,
        preference_accuracy_se=0.17,
        preference_accuracy_normalized=0.5,
        preference_accuracy_normalized_se=0.18,
        n_ties=0,
        logprob_margin_mean=1.5,
        reward_accuracy=reward_accuracy,
        reward_accuracy_se=0.12 if reward_accuracy is not None else None,
        reward_margin_mean=0.3141 if reward_accuracy is not None else None,
    )


def variant_result(
    variant: str,
    evaluation: AlpacaEvalResult | None,
    *,
    model_dir: str | None = None,
    init: str = "base: tiny",
    heldout: HeldoutPreference | None = None,
    paired_vs: PairedVs | None = None,
    training_config: dict | None = None,
) -> VariantResult:
    """A join row of ``variant`` (its loss named alike), trained 2 steps, 1 epoch."""
    trained = EvalResult(
        variant=variant,
        loss=variant,
        model_dir=model_dir or f"/runs/{variant}",
        init=init,
        epoch=1,
        alpaca_eval=evaluation,
        heldout=heldout,
    )
    config = training_config if training_config is not None else {"lr": 5e-6, "epochs": 1}
    return VariantResult(trained, 2, 1.5, final_dev={}, training_config=config, paired_vs=paired_vs)


def legacy_dict(row: VariantResult) -> dict:
    """What the join stored for ``row`` before results were typed: evaluate_variant's row (``variant``, ``loss``,
    ``model_dir``, ``init``, ``epoch``, ``evaluated``, metrics.json flattened in), the training facts, ``paired_vs``."""
    trained, paired = row.evaluation, row.paired_vs
    out = {
        "variant": trained.variant,
        "loss": trained.loss,
        "model_dir": trained.model_dir,
        "init": trained.init,
        "epoch": trained.epoch,
        "evaluated": trained.evaluated,
        **trained.metrics(),
        "train_steps": row.train_steps,
        "train_elapsed_s": row.train_elapsed_s,
        "final_dev": row.final_dev,
        "training_config": row.training_config,
        "paired_vs": None,
    }
    if paired is not None:
        out["paired_vs"] = {
            "baseline": paired.baseline,
            **({"is_baseline": True} if paired.is_baseline else {}),
            **({"unavailable": paired.unavailable} if paired.unavailable is not None else {}),
            **(paired.comparison or {}),
        }
    return out
