"""Held-out preference metrics that need no judge: on the dev preference pairs, how often a model gives the chosen
answer more probability than the rejected one, and (given a reference model) DPO's implicit-reward accuracy/margin."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from steps.evaluate.generation import resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: DPO's default beta (the reference recipe's), used to scale implicit rewards when the caller gives none.
DEFAULT_BETA = 0.1


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


def pair_logprobs(
    model: PreTrainedModel,
    examples: Sequence[Any],
    pad_id: int,
    *,
    max_num_tokens: int,
    desc: str = "held-out pairs",
    show_progress: bool = True,
) -> list[tuple[float, float, int, int]]:
    """(chosen sum, rejected sum, chosen tokens, rejected tokens) per PairExample, in order, with autograd off.

    Summed over the response tokens plus the end-of-turn token, prompt masked: what training scores.
    """
    import torch

    from steps.train.batching import collate_pairs, make_batches
    from steps.train.logprobs import sequence_logprobs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[float, float, int, int] | None] = [None] * len(examples)
    batches = make_batches(examples, max_num_tokens, 0, 0, rows_per_example=2, shuffle=False)
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not show_progress):
                chunk = [examples[i] for i in batch]
                sums, counts = sequence_logprobs(model, collate_pairs(chunk, pad_id).to(device))
                n = len(chunk)
                for j, i in enumerate(batch):
                    out[i] = (float(sums[j]), float(sums[n + j]), int(counts[j]), int(counts[n + j]))
    finally:
        model.train(was_training)
    return [x for x in out if x is not None]


def _accuracy(flags: list[bool]) -> tuple[float | None, float | None]:
    """Fraction true and its binomial standard error."""
    if not flags:
        return None, None
    p = sum(flags) / len(flags)
    return p, math.sqrt(p * (1 - p) / len(flags))


def heldout_preference_metrics(
    model_spec: str | None,
    pairs_rows: Sequence[dict[str, Any]],
    *,
    reference_spec: str | None = None,
    beta: float = DEFAULT_BETA,
    device: str = "auto",
    dtype: str = "float32",
    max_seq_len: int = 2048,
    max_num_tokens: int = 8192,
    overlength: Literal["drop", "truncate"] = "truncate",
    max_pairs: int | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    reference_model: PreTrainedModel | None = None,
    show_progress: bool = True,
    return_per_pair: bool = False,
) -> dict[str, Any]:
    """Preference accuracy of ``model_spec`` (or ``model``) on held-out pairs, and with a reference, reward metrics.

    ``preference_accuracy``: fraction of pairs with log p(chosen) > log p(rejected), summed over the response
    tokens; ``preference_accuracy_normalized``: the same with per-token means (length-normalised, SimPO's score).
    With ``reference_spec`` (or ``reference_model``): DPO's implicit reward ``beta * (log p - log p_ref)``,
    ``reward_accuracy`` (chosen reward > rejected reward) and ``reward_margin_mean``. Ties count as wrong, as in
    TRL's ``rewards/accuracies``. Tokenised, truncated or dropped exactly as training does
    (``steps.train.batching``); accuracies come with binomial standard errors.
    """
    from steps.models import load_model, load_tokenizer
    from steps.train.batching import tokenize_pairs

    if overlength not in ("drop", "truncate"):
        raise ValueError(f"overlength must be 'drop' or 'truncate', got {overlength!r}")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    if model is None and model_spec is None:
        raise ValueError("give model_spec or a loaded model")
    if tokenizer is None and model_spec is None:
        raise ValueError("give model_spec or the loaded model's tokenizer")
    rows = _normalised_rows(list(pairs_rows)[:max_pairs] if max_pairs is not None else list(pairs_rows))
    device = resolve_device(device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model_spec))
    examples, stats = tokenize_pairs(rows, tokenizer, max_seq_len, overlength)
    has_reference = reference_spec is not None or reference_model is not None
    result: dict[str, Any] = {
        "model": model_spec,
        "reference": reference_spec if has_reference else None,
        "beta": float(beta) if has_reference else None,
        "n_rows": len(rows),
        "n_pairs": len(examples),
        "n_dropped_overlength": stats.dropped_overlength,
        "n_truncated": stats.truncated,
        "max_seq_len": max_seq_len,
    }
    if not examples:
        logger.warning(
            "no held-out preference pair left to score (%d rows, %d dropped as over-long)",
            len(rows),
            stats.dropped_overlength,
        )
        return {
            **result,
            "preference_accuracy": None,
            "preference_accuracy_normalized": None,
            "reward_accuracy": None,
            "reward_margin_mean": None,
        }

    loaded = model is None
    policy = model if model is not None else load_model(str(model_spec), dtype=dtype, device=device)
    scores = pair_logprobs(
        policy,
        examples,
        tokenizer.pad_token_id,
        max_num_tokens=max_num_tokens,
        desc=f"held-out pairs {model_spec or 'model'}",
        show_progress=show_progress,
    )
    if loaded:
        del policy
        gc.collect()
    reference_scores = None
    if has_reference:
        ref = (
            reference_model
            if reference_model is not None
            else load_model(str(reference_spec), dtype=dtype, device=device)
        )
        reference_scores = pair_logprobs(
            ref,
            examples,
            tokenizer.pad_token_id,
            max_num_tokens=max_num_tokens,
            desc=f"held-out pairs reference {reference_spec or ''}".strip(),
            show_progress=show_progress,
        )
        del ref
        gc.collect()

    accuracy, accuracy_se = _accuracy([c > r for c, r, _, _ in scores])
    normalized, normalized_se = _accuracy([c / max(nc, 1) > r / max(nr, 1) for c, r, nc, nr in scores])
    result.update(
        preference_accuracy=accuracy,
        preference_accuracy_se=accuracy_se,
        preference_accuracy_normalized=normalized,
        preference_accuracy_normalized_se=normalized_se,
        n_ties=sum(c == r for c, r, _, _ in scores),
        logprob_margin_mean=math.fsum(c - r for c, r, _, _ in scores) / len(scores),
    )
    margins: list[float] = []
    if reference_scores is not None:
        margins = [beta * ((c - rc) - (r - rr)) for (c, r, _, _), (rc, rr, _, _) in zip(scores, reference_scores)]
        reward_accuracy, reward_se = _accuracy([m > 0 for m in margins])
        result.update(
            reward_accuracy=reward_accuracy,
            reward_accuracy_se=reward_se,
            reward_margin_mean=math.fsum(margins) / len(margins),
        )
    else:
        result.update(reward_accuracy=None, reward_accuracy_se=None, reward_margin_mean=None)
    if return_per_pair:
        result["per_pair"] = [
            {
                "id": ex.id,
                "chosen_logp": c,
                "rejected_logp": r,
                "chosen_tokens": nc,
                "rejected_tokens": nr,
                **(
                    {"reference_chosen_logp": reference_scores[i][0], "reference_rejected_logp": reference_scores[i][1]}
                    if reference_scores is not None
                    else {}
                ),
            }
            for i, (ex, (c, r, nc, nr)) in enumerate(zip(examples, scores))
        ]
    logger.info(
        "held-out preference accuracy of %s on %d pairs: %.3f (length-normalised %.3f)%s",
        model_spec,
        len(scores),
        accuracy,
        normalized,
        f", reward accuracy {result['reward_accuracy']:.3f} vs {reference_spec}" if margins else "",
    )
    return result
