"""Training on unpaired feedback (a loss with ``data_kind = "unpaired"``, e.g. KTO) through the same loop as pairs.

Examples are (prompt, completion, desirable?) rows of ``kto.{train,dev}.jsonl``, tokenised with the same chat
encoding as pairs. Each example also has a *KL row*: its prompt with another example's completion, from which the
loss estimates KL(policy ‖ reference) (TRL's KTOTrainer does the same; only the policy's gradient flows, so the
KL rows' policy forward runs without autograd).

Micro-batches are length-bucketed under the token budget once (their membership is the same every epoch; each
epoch shuffles their order), and each example's KL partner is fixed inside its micro-batch: examples are grouped
by prompt and each takes the completion of the example ``s`` places before it, ``s`` being the size of the largest
same-prompt group, so a KL row pairs a prompt with another prompt's completion whenever that is possible (a
permutation: every completion of the micro-batch is used once). An example alone in its micro-batch takes the
first completion of a neighbouring micro-batch. Fixed rows are what lets the reference's KL-row log-probs be
precomputed once, like DPO's (``precompute_reference``). TRL fixes its KL pairs when it builds the dataset
(neighbours in dataset order), with the same effect.

Across ranks the KL estimate of a micro-step is the mean over every rank's KL rows of that micro-step (TRL
gathers it the same way); dev metrics use each micro-batch's own KL rows.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from steps.config import TrainConfig
from steps.losses.kto import kl_from_sums, kl_row_sums
from steps.losses.unpaired import UnpairedLossOutput, summarise
from steps.train import collectives, parallel, reference
from steps.train.batching import LengthStats, TokenBatch, _fit, _tokenize, collate, make_batches
from steps.train.dealing import deal_marked
from steps.train.logprobs import sequence_logprobs
from steps.train.objectives import adapters_disabled_logprobs
from steps.train.precision import Precision
from steps.train.reference import References, ReferenceSource

logger = logging.getLogger(__name__)

KL_KEYS = ("kl_input_ids", "kl_attention_mask", "kl_target_mask")


@dataclass
class UnpairedExample:
    """One tokenised example and its KL row (``kl_*``: this prompt, another example's completion)."""

    id: str
    group: str
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    reference: float | None = None
    kl_prompt_ids: list[int] | None = None
    kl_completion_ids: list[int] | None = None
    kl_partner: str | None = None  # id of the example whose completion the KL row scores
    reference_kl: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def tokens(self) -> int:
        """Tokens of the trained sequence (LengthStats.tokens sums them; the no-grad KL row is not counted)."""
        return self.length


def tokenize_unpaired(
    rows: Sequence[dict], tokenizer: Any, max_seq_len: int, overlength: Literal["drop", "truncate"] = "drop"
) -> tuple[list[UnpairedExample], LengthStats]:
    """KTO rows -> examples, encoded and fitted exactly as pairs are (``batching._tokenize``)."""
    from steps.data.records import ChatMessage, unpaired_messages

    def texts(row: dict) -> tuple[list[ChatMessage], list[str]]:
        prompt, completion, _ = unpaired_messages(row)
        return prompt, [completion]

    def build(example_id: str, row: dict, prompt_ids: list[int], ids: list[list[int]]) -> UnpairedExample:
        group = str(row.get("tree_id", row.get("prompt_id", example_id)))
        return UnpairedExample(example_id, group, prompt_ids, ids[0], unpaired_messages(row)[2])

    # batching._tokenize's TypeVar names the SFT and pair examples; this one has the same ``tokens`` it needs
    return _tokenize(rows, tokenizer, max_seq_len, overlength, texts, build)  # type: ignore[type-var]


def read_unpaired(
    data_dir: str | Path, tokenizer: Any, cfg: TrainConfig
) -> tuple[list[UnpairedExample], list[UnpairedExample], dict[str, dict]]:
    """``kto.{train,dev}.jsonl`` of a prepared data directory, tokenised as ``cfg`` says (``max_examples`` first
    training rows, ``max_seq_len``, ``overlength``); the length stats per split."""
    from steps.io import read_jsonl

    data_dir = Path(data_dir)
    train_path, dev_path = data_dir / "kto.train.jsonl", data_dir / "kto.dev.jsonl"
    if not train_path.exists():
        raise FileNotFoundError(
            f"{train_path} does not exist: the data was prepared before KTO files were written; prepare it again "
            "(prepare_data writes kto.{train,dev}.jsonl for every data format)"
        )
    rows = read_jsonl(train_path)
    rows = rows if cfg.max_examples is None else rows[: cfg.max_examples]
    train, train_stats = tokenize_unpaired(rows, tokenizer, cfg.max_seq_len, cfg.overlength)
    dev_rows = read_jsonl(dev_path) if dev_path.exists() else []
    dev, dev_stats = tokenize_unpaired(dev_rows, tokenizer, cfg.max_seq_len, cfg.overlength)
    logger.info("read %d train / %d dev unpaired examples from %s", len(train), len(dev), data_dir)
    return train, dev, {"train": train_stats.as_dict(), "dev": dev_stats.as_dict()}


def kl_partners(groups: Sequence[str]) -> list[int]:
    """Position of the KL partner of each of n ≥ 2 examples with these prompt groups: a permutation without fixed
    points whose partner has another group whenever no group holds more than half of the examples (groups laid out
    contiguously, each example takes the one ``s`` places before it, ``s`` = the largest group's size ≤ n − 1)."""
    n = len(groups)
    if n < 2:
        raise ValueError(f"KL partners need at least 2 examples, got {n}")
    first: dict[str, int] = {}
    for group in groups:
        first.setdefault(group, len(first))
    order = sorted(range(n), key=lambda i: (first[groups[i]], i))
    shift = min(max(Counter(groups).values()), n - 1)
    partner = [0] * n
    for position, i in enumerate(order):
        partner[i] = order[(position - shift) % n]
    return partner


def assign_kl_rows(examples: Sequence[UnpairedExample], plan: list[list[int]], max_seq_len: int) -> int:
    """Give every example of ``plan`` (micro-batches in length order) its KL row; returns how many micro-batches
    hold a single example (their partner comes from the next micro-batch, or the previous one for the last)."""
    singles = 0
    for b, batch in enumerate(plan):
        if len(batch) >= 2:
            positions = kl_partners([examples[i].group for i in batch])
            partners = [batch[p] for p in positions]
        else:
            singles += 1
            neighbour = plan[b + 1] if b + 1 < len(plan) else plan[b - 1] if b > 0 else None
            if neighbour is None:  # one example in all: no other completion exists
                continue
            partners = [neighbour[0]]
        for i, j in zip(batch, partners):
            example, other = examples[i], examples[j]
            prompt, (completion,) = _fit(example.prompt_ids, [other.completion_ids], max_seq_len)
            example.kl_prompt_ids, example.kl_completion_ids, example.kl_partner = prompt, completion, other.id
    return singles


def collate_unpaired(examples: Sequence[UnpairedExample], pad_id: int, mask_source_tokens: bool = True) -> TokenBatch:
    """Completion rows (one per example) with ``labels``, ``num_examples``, the KL rows (``kl_*`` tensors, one row
    per example that has one) and the precomputed reference sums when every example has them."""
    batch = collate([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id, mask_source_tokens)
    with_kl = [e for e in examples if has_kl_row(e)]
    batch.extra["num_examples"] = len(examples)
    batch.extra["labels"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    batch.extra["num_kl_rows"] = len(with_kl)
    if with_kl:
        kl = collate(
            [e.kl_prompt_ids or [] for e in with_kl],
            [e.kl_completion_ids or [] for e in with_kl],
            pad_id,
            mask_source_tokens,
        )
        batch.extra.update(zip(KL_KEYS, (kl.input_ids, kl.attention_mask, kl.target_mask)))
    if all(e.reference is not None for e in examples) and all(e.reference_kl is not None for e in with_kl):
        batch.extra["reference"] = torch.tensor([e.reference for e in examples], dtype=torch.float64)
        batch.extra["reference_kl"] = torch.tensor([e.reference_kl for e in with_kl], dtype=torch.float64)
    return batch


def kl_rows_of(batch: TokenBatch) -> TokenBatch | None:
    """The KL rows of a collated unpaired batch as a batch of their own (None without any)."""
    if not batch.extra.get("num_kl_rows"):
        return None
    return TokenBatch(*(batch.extra[k] for k in KL_KEYS))


class _StepState:
    """What a step's micro-steps share across ranks: the step's label counts (for exact means) and, for the KL
    all-reduce of every micro-step, the most micro-steps any rank runs: a rank with fewer pads its last micro-step
    with zero contributions, so the collectives of ranks with unequal shares still match one for one."""

    def __init__(self) -> None:
        self.local = [0.0, 0.0]  # this rank's desirable, undesirable examples in the step
        self.local_steps = 0
        self.counts = {"desirable": 0.0, "undesirable": 0.0}
        self.most_steps = 0
        self.done = -1  # -1: the step's first micro-step has not run

    def start(self, desirable: float, undesirable: float, local_steps: int) -> None:
        self.local, self.local_steps, self.done = [desirable, undesirable], local_steps, -1

    def first(self, device: torch.device) -> None:
        """Once per step on every rank (its first micro-step): one all-reduce of the counts."""
        if self.done >= 0:
            return
        rank, world_size = collectives.world()
        vector = torch.zeros(2 + world_size, dtype=torch.float64, device=device)
        vector[:2] = torch.tensor(self.local, dtype=torch.float64)
        vector[2 + rank] = self.local_steps
        collectives.all_reduce_sum(vector, device, "KTO step counts")
        values = vector.tolist()
        self.counts = {"desirable": values[0], "undesirable": values[1]}
        self.most_steps, self.done = int(max(values[2:])), 0

    def reduce_kl(self, sums: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[Σ KL-row log-ratio, rows] summed over the ranks' current micro-steps."""
        collectives.all_reduce_sum(sums, device, "KTO KL rows")
        self.done += 1
        if self.done == self.local_steps:
            for _ in range(self.most_steps - self.local_steps):
                collectives.all_reduce_sum(torch.zeros_like(sums), device, "KTO KL rows")
        return sums


class UnpairedObjective:
    """A registered unpaired loss (``loss_fn.unpaired``) in the loop's Objective protocol (steps.train.loop).

    ``refs.live``: a live reference; ``refs.from_policy``: the policy with its LoRA adapters disabled;
    neither: missing reference sums are scored before step 1 (:meth:`before_training`) from ``refs.source``
    (default: the policy before its first update), or precomputed (``precompute_reference``). ``sync_kl``: under
    torch.distributed, estimate each micro-step's KL over every rank's KL rows (as TRL does)."""

    def __init__(
        self,
        train: Sequence[UnpairedExample],
        dev: Sequence[UnpairedExample],
        pad_id: int,
        cfg: TrainConfig,
        loss_fn: Any,
        refs: References | None = None,
        *,
        sync_kl: bool = True,
    ):
        if getattr(loss_fn, "data_kind", "pairs") != "unpaired":
            raise ValueError(f"UnpairedObjective needs a loss with data_kind 'unpaired', got {loss_fn!r}")
        if cfg.max_batch_examples == 1:
            raise ValueError(
                f"{loss_fn.name}: max_batch_examples = 1 leaves no other completion in a micro-batch for the KL "
                "estimate (TRL refuses a per-device batch of 1 too); use at least 2"
            )
        self.train, self.dev, self.pad_id, self.cfg = list(train), list(dev), pad_id, cfg
        refs = refs or References()
        self.loss_fn, self.reference_model, self.reference_from_policy = loss_fn, refs.live, refs.from_policy
        self.reference_source = refs.source
        self.name = getattr(loss_fn, "name", "unpaired")
        self.sync_kl = sync_kl
        self._membership = self._plan(self.train)
        self._dev_plan = self._plan(self.dev)
        self._step = _StepState()
        for examples, plan, what in ((self.train, self._membership, "train"), (self.dev, self._dev_plan, "dev")):
            singles = assign_kl_rows(examples, plan, cfg.max_seq_len)
            if singles:
                logger.warning(
                    "%s %s: %d of %d micro-batches hold one example (over half the token budget); their KL rows "
                    "take a neighbouring micro-batch's completion (raise max_num_tokens to avoid it)",
                    self.name,
                    what,
                    singles,
                    len(plan),
                )

    def _plan(self, examples: list[UnpairedExample]) -> list[list[int]]:
        cfg = self.cfg
        return make_batches(
            examples, cfg.max_num_tokens, cfg.seed, 0, 1, shuffle=False, max_examples=cfg.max_batch_examples
        )

    # ------------------------------------------------------------------ the loop's protocol

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The fixed micro-batches in this epoch's seeded order (the same on every rank)."""
        order = [list(b) for b in self._membership]
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def epoch_batch_count(self, epoch: int) -> int:
        return len(self._membership)

    def dev_plan(self) -> list[list[int]]:
        """The dev micro-batches (fixed, as the training ones are)."""
        return [list(b) for b in self._dev_plan]

    def collate_train(self, indices: list[int]) -> TokenBatch:
        return collate_unpaired([self.train[i] for i in indices], self.pad_id, self.cfg.mask_source_tokens)

    def epoch_batches(self, epoch: int) -> list[TokenBatch]:
        """Every micro-batch of ``epoch`` collated (for tools such as the benchmark; the loop collates lazily)."""
        return [self.collate_train(b) for b in self.epoch_plan(epoch)]

    def step_denominator(self, micro_batches: list[TokenBatch]) -> float:
        """Examples of this rank's share of the step; also starts the step's bookkeeping (label counts, which the
        first micro-step all-reduces so every rank reports means over the whole step)."""
        desirable = float(sum(int(mb.extra["labels"].sum()) for mb in micro_batches))
        examples = float(sum(mb.extra["num_examples"] for mb in micro_batches))
        self._step.start(desirable, examples - desirable, len(micro_batches))
        return examples

    def micro_step(
        self, model: Any, batch: TokenBatch, denominator: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        self._step.first(parallel.device_of(model))
        out = self._loss(model, batch, sync=self.sync_kl and collectives.is_distributed())
        loss = out.per_example.sum() / denominator
        totals = out.totals()
        n = batch.extra["num_examples"]
        desirable, undesirable = self._step.counts["desirable"], self._step.counts["undesirable"]
        rewards_d = totals["rewards_desirable_sum"] / desirable if desirable else 0.0
        rewards_u = totals["rewards_undesirable_sum"] / undesirable if undesirable else 0.0
        metrics: dict[str, torch.Tensor | float] = {
            "loss": float(loss.detach()),
            "kl": float(out.kl) * n / denominator,
            "kl_rows": float(batch.extra["num_kl_rows"]),
            "rewards_desirable": rewards_d,
            "rewards_undesirable": rewards_u,
            "reward_margin": rewards_d - rewards_u if desirable and undesirable else 0.0,
            "reward_accuracy": totals["correct"] / denominator,
            "count_desirable": totals["count_desirable"],
            "count_undesirable": totals["count_undesirable"],
        }
        return loss, metrics

    def evaluate(self, model: Any) -> dict[str, float]:
        """Dev metrics over the whole dev set: each rank scores its dealt batches, the sums are all-reduced (every
        rank runs the same number of forwards; a short share repeats a batch whose sums are discarded)."""
        if not self.dev:
            return {}
        device = parallel.device_of(model)
        rank, world_size = collectives.world()
        model.eval()
        totals: dict[str, float] = defaultdict(float)
        with torch.no_grad():
            for indices, counts in deal_marked(self._dev_plan, rank, world_size, lockstep=True):
                batch = collate_unpaired([self.dev[i] for i in indices], self.pad_id, self.cfg.mask_source_tokens)
                out = self._loss(model, batch.to(device), sync=False)
                if counts:
                    for key, value in out.totals().items():
                        totals[key] += value
                    totals["kl_weighted"] += float(out.kl) * len(indices)
                    totals["kl_rows"] += batch.extra["num_kl_rows"]
        keys = sorted(set(totals) | {"loss_sum", "kl_weighted", "kl_rows", "correct"})
        vector = torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64, device=device)
        collectives.all_reduce_sum(vector, device, "dev metrics")
        summed = dict(zip(keys, vector.tolist()))
        examples = summed.get("count_desirable", 0.0) + summed.get("count_undesirable", 0.0)
        metrics = summarise(summed, summed["kl_weighted"] / examples) if examples else {}
        return {f"dev_{k}": v for k, v in metrics.items()} | {
            "dev_examples": examples,
            "dev_kl_rows": summed["kl_rows"],
        }

    # ------------------------------------------------------------------ scoring

    def _reference(
        self, model: Any, batch: TokenBatch, kl_batch: TokenBatch | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference sums of the completion rows and of the KL rows: precomputed, the live reference's, or the
        policy's with its adapters disabled (before the policy's own forward, which builds the graph)."""
        device = batch.input_ids.device
        if "reference" in batch.extra:
            return batch.extra["reference"].float(), batch.extra["reference_kl"].float()
        if self.reference_from_policy:
            score = lambda b: adapters_disabled_logprobs(model, b)  # noqa: E731
        elif self.reference_model is not None:
            score = lambda b: sequence_logprobs(self.reference_model, b)[0]  # noqa: E731
        else:
            raise RuntimeError(
                f"{self.name} needs reference log-probs: precompute them (precompute_reference) or pass a live "
                "reference model"
            )
        with torch.no_grad():
            ref = score(batch)
            ref_kl = score(kl_batch) if kl_batch is not None else torch.zeros(0, device=device)
        return ref, ref_kl

    def _loss(self, model: Any, batch: TokenBatch, sync: bool) -> UnpairedLossOutput:
        """The loss output; ``sync``: its KL estimate over every rank's KL rows of this micro-step."""
        kl_batch = kl_rows_of(batch)
        ref, ref_kl = self._reference(model, batch, kl_batch)
        with torch.no_grad():
            policy_kl = sequence_logprobs(model, kl_batch)[0] if kl_batch is not None else torch.zeros_like(ref_kl)
        sums, _ = sequence_logprobs(model, batch)
        labels = batch.extra["labels"]
        kl = kl_from_sums(self._step.reduce_kl(kl_row_sums(policy_kl, ref_kl), sums.device)) if sync else None
        return self.loss_fn.unpaired(sums, labels, ref, policy_kl, ref_kl, kl=kl)

    def before_training(self, model: Any, precision: Precision) -> None:
        """Called by the loop on every rank once the model is wrapped, before step 1 and before a checkpoint is
        restored: rows still without reference sums (and no live reference) are scored now, through ``model`` (the
        wrapped policy, still at its initial weights) or the separate reference ``reference_source`` loads, as DPO's
        pairs are (``steps.train.reference``); rank 0 caches the sums in the run directory."""
        if self.reference_model is not None or self.reference_from_policy:
            return
        source = self.reference_source or ReferenceSource()
        if not self._pending_anywhere(parallel.device_of(model)):
            return
        scorer = source.load() if source.load is not None else (parallel.root_of(model) or model)
        started = time.perf_counter()
        scored = self.precompute_reference(scorer, precision)
        parallel.reshard(scorer)
        logger.info(
            "%s: reference log-probs (%s) of %d rows in %.1f s, in the training micro-batches",
            self.name,
            source.spec or "the policy before its first update",
            scored,
            time.perf_counter() - started,
        )
        if collectives.world()[0] == 0 and source.cache is not None and source.spec is not None:
            write_reference_cache(source.cache, unpaired_cache_key(source.spec, precision), self.train + self.dev)

    def _pending_anywhere(self, device: torch.device) -> bool:
        """Whether any rank lacks a reference sum (scoring is collective: then every rank scores)."""
        pending = any(e.reference is None or _kl_pending(e) for e in self.train + self.dev)
        flag = torch.tensor([1.0 if pending else 0.0], device=device)
        collectives.all_reduce_sum(flag, device, "reference pending")
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ reference precompute

    def precompute_reference(self, model: Any, precision: Precision | None = None, desc: str = "reference") -> int:
        """Fill every train and dev example's missing ``reference`` and ``reference_kl`` in one no-grad pass of
        ``model`` over the micro-batches training and evaluation use, collated as they collate them (same rows, same
        padding: a policy that is its own reference gives log-ratios of exactly 0 at step 1). Micro-batches are
        dealt over the ranks (in lockstep under FSDP2), one all-reduce gives every rank every sum. Returns the sums
        filled (completion rows plus KL rows)."""
        from tqdm.auto import tqdm

        examples = self.train + self.dev
        offset = len(self.train)
        plan = [list(b) for b in self._membership] + [[offset + i for i in b] for b in self._dev_plan]
        device = parallel.device_of(model)
        rank, world_size = collectives.world()
        scores = torch.zeros(len(examples), 2, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        work = deal_marked(plan, rank, world_size, lockstep=parallel.is_sharded(model))
        with torch.no_grad(), reference.autocast_or_nothing(model, precision):
            for b, counts in tqdm(work, desc=f"{desc} log-probs", unit="batch", disable=rank != 0):
                batch = collate_unpaired([examples[i] for i in b], self.pad_id, self.cfg.mask_source_tokens)
                sums = sequence_logprobs(model, batch.to(device))[0].double()
                kl_batch = kl_rows_of(batch)
                kl_sums = sequence_logprobs(model, kl_batch.to(device))[0].double() if kl_batch is not None else None
                if not counts:
                    continue
                scores[torch.tensor(b, dtype=torch.long, device=device), 0] = sums
                if kl_sums is not None:
                    with_kl = [i for i in b if has_kl_row(examples[i])]
                    scores[torch.tensor(with_kl, dtype=torch.long, device=device), 1] = kl_sums
        collectives.all_reduce_sum(scores, device, "reference log-probs")
        model.train(was_training)
        filled = 0
        for example, (ref, ref_kl) in zip(examples, scores.tolist()):
            if example.reference is None:
                example.reference, filled = ref, filled + 1
            if _kl_pending(example):
                example.reference_kl, filled = ref_kl, filled + 1
        return filled


def has_kl_row(example: UnpairedExample) -> bool:
    return example.kl_completion_ids is not None and example.kl_prompt_ids is not None


def _kl_pending(example: UnpairedExample) -> bool:
    return example.reference_kl is None and has_kl_row(example)


def unpaired_cache_key(spec: str, precision: Precision) -> dict[str, str]:
    """What a cache of KTO reference sums must match to be reused (the pairs' key, plus what the rows are)."""
    return {**reference.cache_key(spec, precision), "rows": "unpaired"}


def read_reference_cache(path: Path, key: dict[str, str], examples: Sequence[UnpairedExample]) -> int:
    """Fill reference sums from ``path`` when it was written for ``key``; returns how many examples got both."""
    scores = reference.cached_scores(path, key)
    if not scores:
        return 0
    complete = apply_reference_cache(examples, scores)
    logger.info("reference log-probs of %d unpaired examples read from %s", complete, path)
    return complete


def write_reference_cache(path: Path, key: dict[str, str], examples: Sequence[UnpairedExample]) -> None:
    from steps.io import write_json

    write_json(path, {**key, "scores": reference_cache(examples)}, indent=None)
    logger.info("reference log-probs of %d unpaired examples written to %s", len(examples), path)


def reference_cache(examples: Sequence[UnpairedExample]) -> dict[str, list]:
    """``{id: [reference, reference_kl, kl_partner]}`` to save beside a run (the KL score is valid for that
    partner only: :func:`apply_reference_cache` skips a cached KL score whose partner changed)."""
    return {e.id: [e.reference, e.reference_kl, e.kl_partner] for e in examples}


def apply_reference_cache(examples: Sequence[UnpairedExample], cache: dict[str, list]) -> int:
    """Fill reference sums from :func:`reference_cache` output; returns how many examples got both."""
    complete = 0
    for e in examples:
        cached = cache.get(e.id)
        if not cached:
            continue
        reference, reference_kl, partner = cached
        e.reference = reference
        if partner == e.kl_partner:
            e.reference_kl = reference_kl
        complete += e.reference is not None and (e.reference_kl is not None or e.kl_completion_ids is None)
    return complete
