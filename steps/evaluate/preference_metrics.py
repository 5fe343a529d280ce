"""Held-out preference metrics that need no judge: on the dev preference pairs, how often a model gives the chosen
answer more probability than the rejected one, and (given a reference model) DPO's implicit-reward accuracy/margin."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from steps.evaluate.generation import ModelRun, resolve_device
from steps.evaluate.results import HeldoutPreference

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from steps.config import TrainConfig

logger = logging.getLogger(__name__)

#: Padded tokens per held-out micro-batch. Scoring keeps no activations for a backward pass, so it packs more than
#: training; batch composition moves bf16 sums slightly, so this stays fixed for comparable numbers across runs.
HELDOUT_MAX_NUM_TOKENS = 8192


class PreferenceDataError(ValueError):
    """Preference rows that cannot be scored (missing fields, responses that are not text)."""


def _response_text(value: Any, field: str, index: int) -> str:
    """A response given as text, or as chat messages that are all the assistant's (their contents joined)."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str) for m in value
        )
    ):
        return "".join(m["content"] for m in value)
    raise PreferenceDataError(
        f"preference row {index}: {field!r} must be a string or a list of assistant messages, got {str(value)[:120]}"
    )


def _normalised_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
            raise PreferenceDataError(
                f"preference row {index} needs 'prompt', 'chosen' and 'rejected' "
                f"(preference.dev.jsonl rows), got {str(row)[:120]}"
            )
        out.append(
            {
                **row,
                "chosen": _response_text(row["chosen"], "chosen", index),
                "rejected": _response_text(row["rejected"], "rejected", index),
            }
        )
    return out


@dataclass(frozen=True)
class HeldoutScoring:
    """How held-out pairs are tokenised and scored: as the trained variant's own training section says
    (:meth:`for_variant`: ``max_seq_len``, ``overlength``, ``mask_source_tokens``, and ``beta``, the implicit
    reward's scale, from its loss config when the loss has one), at most ``max_pairs`` of them, in micro-batches of
    at most ``max_num_tokens`` padded tokens (no gradients here, so larger than training's usually are)."""

    max_seq_len: int
    overlength: Literal["drop", "truncate"]
    mask_source_tokens: bool
    beta: float | None = None
    max_pairs: int | None = None
    max_num_tokens: int = HELDOUT_MAX_NUM_TOKENS

    def __post_init__(self) -> None:
        if self.overlength not in ("drop", "truncate"):
            raise ValueError(f"overlength must be 'drop' or 'truncate', got {self.overlength!r}")
        beta = self.beta
        if beta is not None and (not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0):
            raise ValueError(f"beta must be a number > 0 (or None: no reward metrics), got {beta!r}")

    @classmethod
    def for_variant(cls, section: TrainConfig, max_pairs: int | None) -> HeldoutScoring:
        """The scoring of a variant trained with ``section`` (its SFT or resolved preference section)."""
        loss_config = getattr(section, "criterion_config", None)  # SFT has no loss config
        return cls(
            max_seq_len=section.max_seq_len,
            overlength=section.overlength,
            mask_source_tokens=section.mask_source_tokens,
            beta=getattr(loss_config, "beta", None),  # the losses that take a reference all have one
            max_pairs=max_pairs,
        )


def _accuracy(flags: list[bool]) -> tuple[float | None, float | None]:
    """Fraction true and its binomial standard error."""
    if not flags:
        return None, None
    p = sum(flags) / len(flags)
    return p, math.sqrt(p * (1 - p) / len(flags))


def heldout_preference_metrics(
    model_spec: str | None,
    pairs_rows: Sequence[dict[str, Any]],
    scoring: HeldoutScoring,
    run: ModelRun = ModelRun(),
    *,
    reference: str | None = None,
    reference_model: PreTrainedModel | None = None,
    return_per_pair: bool = False,
) -> HeldoutPreference:
    """Preference accuracy of ``model_spec`` (or ``run.model``, with ``run.tokenizer``) on held-out pairs, and with a
    reference (``reference``, loaded like the policy in ``run``'s dtype and device, or ``reference_model``) and a
    beta, DPO's implicit-reward metrics (see :class:`HeldoutPreference`). Ties count as wrong, as in TRL's
    ``rewards/accuracies``. Tokenised, truncated or dropped as training does (``steps.train.batching``), scored by
    training's pair scorer (``steps.train.pair_scores``)."""
    from steps.models import load_tokenizer
    from steps.train.batching import tokenize_pairs

    if run.model is None and model_spec is None:
        raise ValueError("give model_spec or a loaded model")
    if run.tokenizer is None and model_spec is None:
        raise ValueError("give model_spec or the loaded model's tokenizer")
    rows = _normalised_rows(list(pairs_rows)[: scoring.max_pairs])
    tokenizer = run.tokenizer if run.tokenizer is not None else load_tokenizer(str(model_spec))
    examples, stats = tokenize_pairs(rows, tokenizer, scoring.max_seq_len, scoring.overlength)
    has_reference = reference is not None or reference_model is not None
    if has_reference and scoring.beta is None:
        logger.warning("held-out pairs: a reference but no beta (the loss has none): no reward metrics")
    with_reward = has_reference and scoring.beta is not None
    counted = HeldoutPreference(
        model=model_spec,
        reference=reference if with_reward else None,
        beta=float(scoring.beta) if with_reward and scoring.beta is not None else None,
        n_rows=len(rows),
        n_pairs=len(examples),
        n_dropped_overlength=stats.dropped_overlength,
        n_truncated=stats.truncated,
        max_seq_len=scoring.max_seq_len,
    )
    if not examples:
        logger.warning(
            "no held-out preference pair left to score (%d rows, %d dropped as over-long)",
            len(rows),
            stats.dropped_overlength,
        )
        return counted
    score = functools.partial(_score, examples, scoring, tokenizer.pad_token_id, run)
    scores = score(run.model, model_spec, f"held-out pairs {model_spec or 'model'}")
    reference_scores = None
    if with_reward:
        reference_scores = score(reference_model, reference, f"held-out pairs reference {reference or ''}".strip())
    result = dataclasses.replace(counted, **_metrics(scores, reference_scores, scoring.beta))
    if return_per_pair:
        result = dataclasses.replace(result, per_pair=_per_pair(examples, scores, reference_scores))
    logger.info(
        "held-out preference accuracy of %s on %d pairs: %.3f (length-normalised %.3f)%s",
        model_spec,
        len(scores),
        result.preference_accuracy,
        result.preference_accuracy_normalized,
        f", reward accuracy {result.reward_accuracy:.3f} vs {reference}" if reference_scores is not None else "",
    )
    return result


#: (chosen sum, rejected sum, chosen tokens, rejected tokens) of one pair.
PairScore = tuple[float, float, int, int]


def _score(
    examples: Sequence[Any],
    scoring: HeldoutScoring,
    pad_id: int,
    run: ModelRun,
    model: Any,
    spec: str | None,
    desc: str,
) -> list[PairScore]:
    """Each pair's sums and token counts by ``model`` (loaded from ``spec`` as ``run`` says, and freed, when None),
    in length-sorted micro-batches of ``scoring.max_num_tokens``."""
    from steps.models import load_model
    from steps.train.batching import collate_pairs, make_batches
    from steps.train.pair_scores import score_pairs

    loaded = model is None
    scorer = load_model(str(spec), dtype=run.dtype, device=resolve_device(run.device)) if loaded else model
    batches = make_batches(examples, scoring.max_num_tokens, 0, 0, rows_per_example=2, shuffle=False)

    def collate(chunk: list[Any]) -> Any:
        return collate_pairs(chunk, pad_id, scoring.mask_source_tokens)

    sums = score_pairs(
        scorer, examples, [(b, True) for b in batches], collate, desc=desc, show_progress=run.show_progress
    )
    if loaded:
        del scorer
        gc.collect()
    return [(c, r, int(nc), int(nr)) for c, r, nc, nr in sums.tolist()]


def _metrics(scores: list[PairScore], reference_scores: list[PairScore] | None, beta: float | None) -> dict[str, Any]:
    """The accuracies and margins of :class:`HeldoutPreference` from the policy's (and the reference's) scores."""
    accuracy, accuracy_se = _accuracy([c > r for c, r, _, _ in scores])
    normalized, normalized_se = _accuracy([c / max(nc, 1) > r / max(nr, 1) for c, r, nc, nr in scores])
    metrics: dict[str, Any] = {
        "preference_accuracy": accuracy,
        "preference_accuracy_se": accuracy_se,
        "preference_accuracy_normalized": normalized,
        "preference_accuracy_normalized_se": normalized_se,
        "n_ties": sum(c == r for c, r, _, _ in scores),
        "logprob_margin_mean": math.fsum(c - r for c, r, _, _ in scores) / len(scores),
    }
    if reference_scores is not None and beta is not None:
        margins = [beta * ((c - rc) - (r - rr)) for (c, r, _, _), (rc, rr, _, _) in zip(scores, reference_scores)]
        reward_accuracy, reward_se = _accuracy([m > 0 for m in margins])
        metrics.update(
            reward_accuracy=reward_accuracy,
            reward_accuracy_se=reward_se,
            reward_margin_mean=math.fsum(margins) / len(margins),
        )
    return metrics


def _per_pair(
    examples: Sequence[Any], scores: list[PairScore], reference_scores: list[PairScore] | None
) -> list[dict[str, Any]]:
    out = []
    for i, (ex, (c, r, nc, nr)) in enumerate(zip(examples, scores)):
        row = {"id": ex.id, "chosen_logp": c, "rejected_logp": r, "chosen_tokens": nc, "rejected_tokens": nr}
        if reference_scores is not None:
            row.update(reference_chosen_logp=reference_scores[i][0], reference_rejected_logp=reference_scores[i][1])
        out.append(row)
    return out
