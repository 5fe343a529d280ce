"""The one scorer of preference pairs: each pair's chosen and rejected log-prob sums (response tokens plus the end
token, prompt masked, as training scores them) and token counts, through any model: a bare Hugging Face model, the
training root (DDP's module, FSDP2) or a peft policy with its adapters off. The reference pass before training
(``steps.train.reference``), dev metrics during training (``PreferenceObjective.evaluate``) and held-out metrics at
evaluation (``steps.evaluate.preference_metrics``) all call :func:`score_pairs`; they differ only in the batch plan
they hand it and in what they compute from the scores."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from steps.train import collectives, parallel
from steps.train.batching import PairExample, TokenBatch
from steps.train.logprobs import sequence_logprobs

#: Columns of the tensor :func:`score_pairs` returns.
CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS = range(4)

#: A batch plan: (example indices of one micro-batch, whether its scores count) in the order they are scored. A
#: batch that does not count is still run (FSDP2's ranks must run the same number of forwards) and then discarded.
Plan = Sequence[tuple[list[int], bool]]


def score_pairs(
    model: Any,
    pairs: Sequence[PairExample],
    plan: Plan,
    collate: Callable[[list[PairExample]], TokenBatch],
    *,
    desc: str = "pairs",
    show_progress: bool = True,
) -> torch.Tensor:
    """[len(pairs), 4] float64 on the model's device: (chosen sum, rejected sum, chosen tokens, rejected tokens) of
    every pair a counted batch of ``plan`` holds, zeros for the others (a distributed caller's all-reduce sums the
    ranks' shares). No autograd; the caller's compute context (autocast) applies; ``model`` is in eval mode while it
    scores and goes back to the mode it had. ``collate`` turns a batch's pairs into a TokenBatch (chosen rows, then
    rejected rows)."""
    from tqdm.auto import tqdm

    device = parallel.device_of(model)
    scores = torch.zeros((len(pairs), 4), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    hidden = not show_progress or collectives.world()[0] != 0
    try:
        with torch.no_grad():
            for indices, counts in tqdm(plan, desc=desc, unit="batch", disable=hidden):
                sums, tokens = sequence_logprobs(model, collate([pairs[i] for i in indices]).to(device))
                if counts:
                    n = len(indices)
                    rows = torch.tensor(indices, dtype=torch.long, device=device)
                    scores[rows] = torch.stack([sums[:n], sums[n:], tokens[:n], tokens[n:]], dim=1).to(scores.dtype)
    finally:
        model.train(was_training)
    return scores


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[Any]:
    """The scorer of ``model`` (a peft policy, or the training root around one) with its LoRA adapters disabled: the
    frozen base's numbers from the weights already in memory, through the same root (and so the same hooks) as the
    policy's own forward."""
    lm = parallel.unwrap(model)
    if not hasattr(lm, "disable_adapter"):
        raise RuntimeError(
            f"reference_from_policy needs a policy with LoRA adapters (peft); got {type(lm).__name__}: "
            "enable lora, or give a reference model"
        )
    with lm.disable_adapter():
        yield parallel.root_of(model) or lm
