"""What evaluation produces, typed once: alpaca_eval's numbers (:class:`WinRates`), the judge behind them
(:class:`JudgeRecord`), one model's AlpacaEval 2 evaluation (:class:`AlpacaEvalResult`, what ``evaluate_model``
returns), the judge-free held-out preference metrics (:class:`HeldoutPreference`), the evaluate step's artifact
(:class:`EvalResult`) and one row of the join's ``results`` (:class:`VariantResult`).

Frozen dataclasses: Metaflow pickles them as artifacts and the Client API gives them back as they were
(``Run(...)["evaluate"].task.data.result``); the report reads earlier runs' plain dicts through one adapter
(``steps.report.rows.legacy_result_row``). ``metrics.json`` stays alpaca_eval's flat object
(:meth:`AlpacaEvalResult.metrics_json`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from steps.evaluate.provenance import Provenance

if TYPE_CHECKING:
    from steps.evaluate.judges import Judge
    from steps.evaluate.weight_changes import WeightChange


@dataclass(frozen=True)
class WinRates:
    """One model against one reference: ``alpaca_eval.metrics.get_winrate``'s numbers, the average output length,
    and the length-controlled win rate with the computation that produced it named (``lc_method``); where no
    meaningful LC exists it is None and ``lc_unavailable_reason`` says why; alpaca_eval's NaN (no judged row) is
    None. Fields in metrics.json's order."""

    win_rate: float | None
    standard_error: float | None
    n_wins: int
    n_wins_base: int
    n_draws: int
    n_total: int
    discrete_win_rate: float | None
    avg_length: int
    lc_method: str
    lc_assets: str | None
    lc_approximate_assets: bool
    length_controlled_winrate: float | None
    lc_standard_error: float | None
    lc_unavailable_reason: str | None


@dataclass(frozen=True)
class JudgeRecord:
    """The judge that gave the preferences: its label, whether it is a weak (smoke-test) judge, its own settings
    (``details``: model, server, annotator config, ...), its recorded agreement with official annotations (None:
    never measured), the tokens it used and their estimated cost (None for local or unpriced judges)."""

    label: str
    weak: bool
    details: dict[str, Any]
    agreement: dict[str, Any] | None
    tokens: dict[str, int]
    cost_usd: float | None
    price: dict[str, Any] | None
    cost_note: str

    @classmethod
    def of(
        cls, judge: Judge, annotations: list[dict[str, Any]], agreement_registry: str | os.PathLike | None
    ) -> JudgeRecord:
        """The record of ``judge`` after it judged ``annotations`` (tokens summed over them, cached ones included)
        with its latest agreement measurement in ``agreement_registry`` (None: the default registry)."""
        from steps.evaluate.agreement import recorded_agreement
        from steps.evaluate.judge_cost import judge_cost, judge_usage

        tokens = judge_usage(annotations)
        cost, price, note = judge_cost(tokens, judge.price_model)
        details = judge.metadata()
        label, weak = details.pop("judge"), details.pop("weak_judge")
        return cls(label, weak, details, recorded_agreement(judge, agreement_registry), tokens, cost, price, note)

    def metrics_json(self) -> dict[str, Any]:
        """The judge's keys of metrics.json, in its order."""
        return {
            "judge": self.label,
            "weak_judge": self.weak,
            **self.details,
            "judge_agreement": self.agreement,
            "judge_tokens": self.tokens,
            "judge_cost_usd": self.cost_usd,
            "judge_price": self.price,
            "judge_cost_note": self.cost_note,
        }


@dataclass(frozen=True)
class HeldoutPreference:
    """Judge-free metrics on the held-out (dev) preference pairs (``steps.evaluate.preference_metrics``).

    ``preference_accuracy``: share of pairs whose chosen response has the higher summed log-prob;
    ``preference_accuracy_normalized``: the same on per-token means. With a reference and a beta: DPO's implicit
    reward ``beta * (log p - log p_ref)``, its accuracy and mean margin. Accuracies carry binomial standard errors;
    every metric is None where no pair was left to score. ``per_pair``: each pair's sums, when asked for."""

    model: str | None
    reference: str | None
    beta: float | None
    n_rows: int
    n_pairs: int
    n_dropped_overlength: int
    n_truncated: int
    max_seq_len: int
    preference_accuracy: float | None = None
    preference_accuracy_se: float | None = None
    preference_accuracy_normalized: float | None = None
    preference_accuracy_normalized_se: float | None = None
    n_ties: int | None = None
    logprob_margin_mean: float | None = None
    reward_accuracy: float | None = None
    reward_accuracy_se: float | None = None
    reward_margin_mean: float | None = None
    per_pair: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        """``heldout_preference`` in metrics.json (``per_pair`` only where it was asked for)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.per_pair is None:
            del out["per_pair"]
        return out


@dataclass(frozen=True)
class EvalFiles:
    """Where one evaluation wrote its alpaca_eval files."""

    model_outputs: str
    annotations: str
    metrics: str


@dataclass(frozen=True)
class AlpacaEvalResult:
    """One model's AlpacaEval 2 evaluation: generated with ``generator``'s name on the eval set, judged against
    ``reference_generator``'s outputs, scored. ``generation``: the sampling settings and how the answers were made
    (backend, dtype, speed). ``weight_change``: whether the scored model differs from its init in the dtype it
    generated in (None: not checked). ``provenance``: what produced the row (None: evaluated before it was
    recorded; such a row is never paired with one that has it)."""

    model: str
    generator: str
    scores: WinRates
    judge: JudgeRecord
    weight_change: WeightChange | None
    eval_set: str
    eval_set_source: str
    subset: bool
    n_instructions: int
    reference_generator: str | list[str]
    generation: dict[str, Any]
    files: EvalFiles
    provenance: Provenance | None = None

    def metrics_json(self, heldout: HeldoutPreference | None = None) -> dict[str, Any]:
        """metrics.json: alpaca_eval's flat metrics object, then what produced them (plain JSON values)."""
        doc = {
            **asdict(self.scores),
            "model": self.model,
            "generator": self.generator,
            **self.judge.metrics_json(),
            "heldout_preference": heldout.as_dict() if heldout is not None else None,
            "weight_change": self.weight_change.record() if self.weight_change is not None else None,
            "eval_set": self.eval_set,
            "eval_set_source": self.eval_set_source,
            "subset": self.subset,
            "n_instructions": self.n_instructions,
            "reference_generator": self.reference_generator,
            "generation": self.generation,
            "files": asdict(self.files),
            "provenance": self.provenance.as_dict() if self.provenance is not None else None,
        }
        return json.loads(json.dumps(doc, default=str))


@dataclass(frozen=True)
class Accuracy:
    """One accuracy of a verifiable benchmark in % with its standard error (None: nothing scored), over
    ``n_scored`` items; ``n_unscored`` items could not be verified offline and are left out, never guessed."""

    accuracy: float | None
    standard_error: float | None
    n_scored: int
    n_unscored: int

    @classmethod
    def of(cls, stats: dict[str, Any]) -> Accuracy:
        """From one level of ``steps.evaluate.verifiable.accuracy.accuracy_summary``."""
        return cls(stats["accuracy"], stats["standard_error"], int(stats["n_scored"]), int(stats["n_unscored"]))


@dataclass(frozen=True)
class VerifiableFiles:
    """Where one verifiable-benchmark evaluation wrote the model's responses and the per-prompt results."""

    responses: str
    results: str


@dataclass(frozen=True)
class VerifiableResult:
    """One model on a benchmark checked by code, not a judge (IFBench): prompt-level (every instruction of a prompt
    followed) and instruction-level accuracy, strict and loose; how the answers were made (``generation``: the
    AlpacaEval settings, backend, dtype, speed), what scored them (``provenance``: package, wheel and prompt-set
    hashes, subset rule) and where the responses and per-prompt results are."""

    benchmark: str
    prompt_strict: Accuracy
    prompt_loose: Accuracy
    instruction_strict: Accuracy
    instruction_loose: Accuracy
    n_prompts: int
    generation: dict[str, Any]
    provenance: dict[str, Any]
    files: VerifiableFiles
    scoring_seconds: float


@dataclass(frozen=True)
class BenchmarkScore:
    """One lm-evaluation-harness benchmark's headline metric (``value`` and ``stderr`` in % for rates, else as
    lm_eval reports them) and what identifies it (task version, n-shot, documents)."""

    task: str
    metric: str
    value: float | None
    stderr: float | None
    percent: bool
    n: int
    num_fewshot: int | None
    version: Any

    @classmethod
    def of(cls, entry: dict[str, Any]) -> BenchmarkScore:
        """From one entry of ``steps.evaluate.harness.run_benchmarks``'s summary (rates scaled to %)."""
        scale = 100.0 if entry.get("percent") else 1.0
        value, stderr = entry.get("value"), entry.get("stderr")
        return cls(
            task=str(entry["task"]),
            metric=str(entry["metric"]),
            value=None if value is None else value * scale,
            stderr=None if stderr is None else stderr * scale,
            percent=bool(entry.get("percent")),
            n=int(entry.get("n", 0)),
            num_fewshot=entry.get("num_fewshot"),
            version=entry.get("version"),
        )


@dataclass(frozen=True)
class HarnessResult:
    """The ``evaluation.benchmarks`` (lm-evaluation-harness) run on one model: scores in the configured order, the
    lm_eval version, the dtype and device it ran in, and the summary file (``benchmarks.json``) beside the raw ones."""

    scores: tuple[BenchmarkScore, ...]
    lm_eval_version: str
    dtype: str
    device: str
    summary_file: str


@dataclass(frozen=True)
class HubUpload:
    """Where ``push_to_hub`` put a model (or, dry run, would have): never the token's value."""

    repo_id: str
    private: bool
    dry_run: bool
    url: str
    token_env: str | None
    total_bytes: int
    n_files: int
    commit: str | None = None

    @classmethod
    def of(cls, upload: dict[str, Any]) -> HubUpload:
        """From ``steps.hub.push_to_hub``'s report (its file list counted)."""
        names = ("repo_id", "private", "dry_run", "url", "token_env", "total_bytes")
        commit = upload.get("commit")  # a real upload's; a dry run has none
        return cls(**{k: upload[k] for k in names}, n_files=len(upload["files"]), commit=commit)


@dataclass(frozen=True)
class EvalResult:
    """The evaluate step's artifact: one trained model (variant, loss, where it is and what it started from), its
    AlpacaEval 2 evaluation (None: evaluation disabled), its held-out preference metrics (None: not computed), its
    Hub upload (None: not pushed), its IFBench accuracy (None: not scored) and its lm-evaluation-harness scores
    (None: ``evaluation.benchmarks`` empty)."""

    variant: str
    loss: str
    model_dir: str
    init: str  # what training started from, as the table shows it ("SFT checkpoint", "base: <spec>")
    epoch: int
    alpaca_eval: AlpacaEvalResult | None = None
    heldout: HeldoutPreference | None = None
    hub: HubUpload | None = None
    round: int | None = None  # on-policy rounds: the round (1, 2, ...) whose model this is, of variant round_of
    round_of: str | None = None
    ifbench: VerifiableResult | None = None
    benchmarks: HarnessResult | None = None

    @property
    def evaluated(self) -> bool:
        return self.alpaca_eval is not None

    def metrics(self) -> dict[str, Any]:
        """metrics.json of the evaluation, held-out metrics included (what the trackers log); {} if not evaluated."""
        return self.alpaca_eval.metrics_json(self.heldout) if self.alpaca_eval is not None else {}


@dataclass(frozen=True)
class PairedVs:
    """A row's paired difference from the baseline variant on the same items: the baseline row itself
    (``is_baseline``), the numbers (``comparison``: ``steps.evaluate.paired.paired_comparison``'s for win rate,
    ``steps.evaluate.verifiable.accuracy.paired_accuracy_delta``'s for IFBench), or why there are none
    (``unavailable``, e.g. a judge that gave no usable preference)."""

    baseline: str
    is_baseline: bool = False
    comparison: dict[str, Any] | None = None
    unavailable: str | None = None


@dataclass(frozen=True)
class VariantResult:
    """One row of the join's ``results``: a model's evaluation, the training facts the report prints beside it
    (``training_config``: the variant's training section as plain values) and its paired comparison."""

    evaluation: EvalResult
    train_steps: int
    train_elapsed_s: float
    final_dev: dict[str, float]
    training_config: dict[str, Any]
    paired_vs: PairedVs | None = None
    paired_previous: PairedVs | None = None  # a round's model against the model the round started from
    # the paired difference in IFBench prompt-level strict accuracy from the same baseline, on the same prompts
    paired_ifbench: PairedVs | None = None

    @property
    def variant(self) -> str:
        return self.evaluation.variant
