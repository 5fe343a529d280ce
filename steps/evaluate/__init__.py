"""AlpacaEval 2 evaluation: generate answers, judge them against reference answers, score WR and LC WR. Every
result names its judge; the offline default (the embedded 135M model) checks the mechanism only (``weak_judge``)."""

from __future__ import annotations

from steps.evaluate.agreement import judge_agreement, record_agreement, recorded_agreement
from steps.evaluate.annotate import AnnotationInputError, annotate, pair_outputs
from steps.evaluate.eval_sets import EvalSet, EvalSetError, load_eval_set
from steps.evaluate.evaluation import EvalContext, evaluate_model, reference_outputs_for, write_metrics
from steps.evaluate.generation import ModelRun, generate_outputs
from steps.evaluate.judge_cost import judge_cost, judge_usage
from steps.evaluate.judges import DEFAULT_JUDGE, DEFAULT_JUDGE_MAX_CHARS, Judge, JudgeError, ServedJudge, make_judge
from steps.evaluate.judges.annotator_prompt import OFFICIAL_ANNOTATOR
from steps.evaluate.paired import paired_comparison
from steps.evaluate.preference_metrics import HeldoutScoring, heldout_preference_metrics
from steps.evaluate.results import (
    AlpacaEvalResult,
    EvalResult,
    HeldoutPreference,
    HubUpload,
    JudgeRecord,
    PairedVs,
    VariantResult,
    WinRates,
)
from steps.evaluate.scoring import MIN_INSTRUCTIONS_FOR_LC, score
from steps.evaluate.settings import GenerationError, GenerationSettings
from steps.models import DEFAULT_MODEL

__all__ = [
    "DEFAULT_JUDGE",
    "DEFAULT_JUDGE_MAX_CHARS",
    "DEFAULT_MODEL",
    "MIN_INSTRUCTIONS_FOR_LC",
    "OFFICIAL_ANNOTATOR",
    "AlpacaEvalResult",
    "AnnotationInputError",
    "EvalContext",
    "EvalResult",
    "EvalSet",
    "EvalSetError",
    "GenerationError",
    "GenerationSettings",
    "HeldoutPreference",
    "HeldoutScoring",
    "HubUpload",
    "Judge",
    "JudgeError",
    "JudgeRecord",
    "ModelRun",
    "PairedVs",
    "ServedJudge",
    "VariantResult",
    "WinRates",
    "annotate",
    "evaluate_model",
    "generate_outputs",
    "heldout_preference_metrics",
    "judge_agreement",
    "judge_cost",
    "judge_usage",
    "load_eval_set",
    "make_judge",
    "pair_outputs",
    "paired_comparison",
    "record_agreement",
    "recorded_agreement",
    "reference_outputs_for",
    "score",
    "write_metrics",
]
