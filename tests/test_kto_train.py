"""Training on unpaired feedback: KL partners, collation, the objective's numbers, a short real KTO run of the tiny
model through steps.train.loop.train, and two gloo ranks."""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from steps.config import DataConfig, PreferenceConfig
from steps.losses import build_loss
from steps.train.batching import collate, make_batches
from steps.train.logprobs import sequence_logprobs
from steps.train.loop import train
from steps.train.reference import References
from steps.train.unpaired import (
    UnpairedExample,
    UnpairedObjective,
    apply_reference_cache,
    assign_kl_rows,
    collate_unpaired,
    kl_partners,
    read_unpaired,
    reference_cache,
    tokenize_unpaired,
)
from tests.test_train import TOPICS_DEV, TOPICS_TRAIN


def kto_rows(topics: list[str], both: bool = True) -> list[dict]:
    """A desirable and an undesirable answer per topic (only one, alternating, unless ``both``)."""
    rows = []
    for i, topic in enumerate(topics):
        prompt = [{"role": "user", "content": f"Describe {topic}."}]
        for label, words in ((True, "wonderful and helpful"), (False, "terrible and useless")):
            if both or label == (i % 2 == 0):
                completion = [{"role": "assistant", "content": f"{topic.capitalize()} are {words}."}]
                rows.append(
                    {
                        "id": f"{topic}:{label}",
                        "tree_id": topic,
                        "prompt": prompt,
                        "completion": completion,
                        "label": label,
                    }
                )
    return rows


def example(i: int, group: str, prompt_len: int = 3, completion_len: int = 4) -> UnpairedExample:
    return UnpairedExample(f"e{i}", group, [100 + i] * prompt_len, [200 + i] * completion_len, desirable=i % 2 == 0)


# ---------------------------------------------------------------- KL partners


def test_kl_partners_by_hand():
    assert kl_partners(["a", "b", "c", "d"]) == [3, 0, 1, 2]  # TRL's rotation: example i takes y_{i-1}
    assert kl_partners(["a", "a", "b", "c"]) == [2, 3, 0, 1]  # shift 2: no prompt gets one of its own replies
    # three of five share a prompt: one same-prompt pairing is unavoidable (example 0 takes example 4's reply)
    assert kl_partners(["a", "b", "a", "b", "a"]) == [4, 0, 1, 2, 3]
    assert kl_partners(["a", "a"]) == [1, 0]
    with pytest.raises(ValueError, match="at least 2"):
        kl_partners(["a"])


@settings(max_examples=200, derandomize=True, deadline=None, database=None)
@given(st.lists(st.sampled_from("abcdef"), min_size=2, max_size=12))
def test_kl_partners_are_a_derangement_across_prompts_when_possible(groups):
    partner = kl_partners(groups)
    n = len(groups)
    assert sorted(partner) == list(range(n)) and all(partner[i] != i for i in range(n))
    if max(groups.count(g) for g in set(groups)) <= n / 2:
        assert all(groups[partner[i]] != groups[i] for i in range(n))


def test_assign_kl_rows_fits_and_borrows_for_single_examples():
    examples = [example(0, "a"), example(1, "b"), example(2, "c", 6, 9)]
    singles = assign_kl_rows(examples, [[0, 1], [2]], max_seq_len=12)
    assert singles == 1
    assert (examples[0].kl_partner, examples[1].kl_partner) == ("e1", "e0")
    assert examples[0].kl_prompt_ids == [100] * 3 and examples[0].kl_completion_ids == [201] * 4
    # the lone example takes the first completion of the micro-batch before it: 6 + 4 tokens fit in 12
    assert examples[2].kl_partner == "e0" and examples[2].kl_completion_ids == [200] * 4
    # over-long KL rows are fitted like examples: the prompt keeps its end (down to half the length) first
    long = [example(0, "a", 2, 10), example(1, "b", 10, 2)]
    assign_kl_rows(long, [[0, 1]], max_seq_len=12)
    assert long[1].kl_prompt_ids == [101] * 6 and long[1].kl_completion_ids == [200] * 6
    alone = [example(0, "a")]
    assert assign_kl_rows(alone, [[0]], 12) == 1 and alone[0].kl_completion_ids is None


def test_collate_unpaired_rows_kl_rows_and_reference():
    examples = [example(0, "a"), example(1, "b", 5, 2), example(2, "c")]
    assign_kl_rows(examples, [[0, 1, 2]], 64)
    batch = collate_unpaired(examples, pad_id=0)
    assert batch.extra["num_examples"] == 3 and batch.extra["labels"].tolist() == [True, False, True]
    expected = collate([e.prompt_ids for e in examples], [e.completion_ids for e in examples], 0)
    assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.target_mask, expected.target_mask)
    kl = collate([e.prompt_ids for e in examples], [examples[j].completion_ids for j in (2, 0, 1)], 0)
    assert torch.equal(batch.extra["kl_input_ids"], kl.input_ids)
    assert torch.equal(batch.extra["kl_target_mask"], kl.target_mask) and batch.extra["num_kl_rows"] == 3
    assert "reference" not in batch.extra
    for i, e in enumerate(examples):
        e.reference, e.reference_kl = -float(i), -10.0 - i
    batch = collate_unpaired(examples, pad_id=0)
    assert batch.extra["reference"].tolist() == [0.0, -1.0, -2.0]
    assert batch.extra["reference_kl"].tolist() == [-10.0, -11.0, -12.0]


# ---------------------------------------------------------------- the objective on the tiny model


@pytest.fixture()
def kto_data(tokenizer):
    train_ex, stats = tokenize_unpaired(kto_rows(TOPICS_TRAIN), tokenizer, 256)
    dev_ex, _ = tokenize_unpaired(kto_rows(TOPICS_DEV, both=False), tokenizer, 256)
    assert stats.kept == 32 and sum(e.desirable for e in train_ex) == 16 and len(dev_ex) == 6
    return train_ex, dev_ex


def one_row_logprob(model, prompt, completion, pad_id):
    with torch.no_grad():
        return float(sequence_logprobs(model, collate([prompt], [completion], pad_id))[0][0])


def test_step_metrics_are_the_formula_over_the_step(tokenizer, tiny_model_factory, kto_data):
    """Reference = model A, policy = model B: every number of one optimizer step (two micro-batches) recomputed
    here from single-row log-probs and the KTO formula."""
    train_ex, _ = kto_data
    pad = tokenizer.pad_token_id
    cfg = PreferenceConfig(max_num_tokens=400, seed=3)
    beta, w_d, w_u = 0.3, 1.2, 0.7
    loss = build_loss("kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    reference, policy = tiny_model_factory(seed=1), tiny_model_factory(seed=2)
    obj = UnpairedObjective(train_ex, [], pad, cfg, loss)
    assert obj.precompute_reference(reference) == 64  # 32 completion rows + 32 KL rows
    plan = obj.epoch_plan(0)[:2]
    batches = [obj.collate_train(b) for b in plan]
    denominator = obj.step_denominator(batches)
    totals: dict[str, float] = {}
    for batch in batches:
        _, metrics = obj.micro_step(policy, batch, denominator)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
    by_hand, rewards, kls = [], {True: [], False: []}, []
    for indices in plan:
        examples = [train_ex[i] for i in indices]
        kl_terms = [
            one_row_logprob(policy, e.kl_prompt_ids, e.kl_completion_ids, pad) - e.reference_kl for e in examples
        ]
        kl = max(0.0, sum(kl_terms) / len(kl_terms))
        kls += [kl] * len(examples)
        for e in examples:
            ratio = one_row_logprob(policy, e.prompt_ids, e.completion_ids, pad) - e.reference
            z = beta * (ratio - kl) if e.desirable else beta * (kl - ratio)
            by_hand.append((w_d if e.desirable else w_u) * (1 - 1 / (1 + math.exp(-z))))
            rewards[e.desirable].append(beta * ratio)
    n = len(by_hand)
    assert denominator == n
    assert totals["loss"] == pytest.approx(sum(by_hand) / n, abs=1e-6)
    assert totals["kl"] == pytest.approx(sum(kls) / n, abs=1e-6)
    assert totals["rewards_desirable"] == pytest.approx(sum(rewards[True]) / len(rewards[True]), abs=1e-5)
    assert totals["rewards_undesirable"] == pytest.approx(sum(rewards[False]) / len(rewards[False]), abs=1e-5)
    assert totals["count_desirable"] + totals["count_undesirable"] == n and totals["kl_rows"] == n


def test_kto_trains_the_tiny_model(tokenizer, tiny_model_factory, kto_data, tmp_path):
    train_ex, dev_ex = kto_data
    cfg = PreferenceConfig(lr=2e-3, final_lr=2e-4, max_num_tokens=400, epochs=3, seed=5, weight_decay=0.0)
    model = tiny_model_factory(seed=1)
    obj = UnpairedObjective(train_ex, dev_ex, tokenizer.pad_token_id, cfg, build_loss("kto", beta=0.1))
    obj.precompute_reference(model)
    before = obj.evaluate(model)
    # the policy is its own reference: every log-ratio is 0, KL = 0, so every loss is 1 − σ(0) = 0.5
    assert before["dev_loss"] == pytest.approx(0.5, abs=1e-6) and before["dev_kl"] == pytest.approx(0.0, abs=1e-6)
    assert before["dev_examples"] == 6 and before["dev_kl_rows"] == 6
    result = train(model, obj, cfg, tmp_path, desc="kto-test")
    history = [h["loss"] for h in result.history]
    assert len(history) >= 6 and history[0] == pytest.approx(0.5, abs=1e-6)
    assert all(math.isfinite(v) for h in result.history for v in h.values() if isinstance(v, float))
    assert sum(history[-3:]) / 3 < 0.5 - 0.05, history
    after = result.dev_history[-1]
    assert after["dev_loss"] < 0.5 - 0.02, after
    assert after["dev_rewards_desirable"] > after["dev_rewards_undesirable"], after
    assert after["dev_reward_accuracy"] >= 0.5 and math.isfinite(after["dev_kl"]), after
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"kl", "rewards_desirable", "reward_margin", "count_undesirable"} <= set(logged[0])


def test_prepared_data_to_training(tokenizer, tiny_model_factory, tmp_path):
    """The whole chain on the embedded OpenAssistant sample: prepare_data's KTO files, read, tokenised, trained."""
    from steps.data import prepare_data

    stats = prepare_data(DataConfig(input="embedded"), tmp_path / "data").stats["kto"]
    cfg = PreferenceConfig(lr=1e-3, max_num_tokens=1024, max_seq_len=512, max_steps=3, max_examples=40, seed=2)
    train_ex, dev_ex, lengths = read_unpaired(tmp_path / "data", tokenizer, cfg)
    assert len(train_ex) + lengths["train"]["dropped_overlength"] == min(40, stats["split_sizes"]["train"])
    assert len(dev_ex) + lengths["dev"]["dropped_overlength"] == stats["split_sizes"]["dev"]
    assert {e.desirable for e in train_ex} == {True, False}
    model = tiny_model_factory(seed=3)
    obj = UnpairedObjective(train_ex, dev_ex, tokenizer.pad_token_id, cfg, build_loss("kto"))
    obj.precompute_reference(model)
    result = train(model, obj, cfg, tmp_path / "run", desc="kto-embedded")
    assert result.final_step == 3 and result.history[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["kl"]) for h in result.history)
    assert result.dev_history[-1]["dev_examples"] == len(dev_ex)
    with pytest.raises(FileNotFoundError, match="prepare it again"):
        read_unpaired(tmp_path, tokenizer, cfg)


def test_live_reference_gives_the_precomputed_numbers(tokenizer, tiny_model_factory, kto_data):
    train_ex, dev_ex = kto_data
    cfg = PreferenceConfig(max_num_tokens=400, seed=3)
    loss = build_loss("kto", beta=0.2)
    reference, policy = tiny_model_factory(seed=1), tiny_model_factory(seed=2)
    live = UnpairedObjective(
        copy.deepcopy(train_ex), dev_ex, tokenizer.pad_token_id, cfg, loss, References(live=reference)
    )
    pre = UnpairedObjective(train_ex, copy.deepcopy(dev_ex), tokenizer.pad_token_id, cfg, loss)
    pre.precompute_reference(reference)
    for obj in (live, pre):
        obj.step_denominator([obj.collate_train(obj.epoch_plan(0)[0])])
    a = live.micro_step(policy, live.collate_train(live.epoch_plan(0)[0]), 10.0)[1]
    b = pre.micro_step(policy, pre.collate_train(pre.epoch_plan(0)[0]), 10.0)[1]
    assert a == pytest.approx(b, abs=1e-6)
    assert live.evaluate(policy) == pytest.approx(pre.evaluate(policy), abs=1e-6)


def test_lora_policy_with_adapters_off_is_the_reference(tokenizer, tiny_model_factory, kto_data, tmp_path):
    """reference_from_policy: after LoRA training moved the adapters, the adapters-off scores are the base's."""
    pytest.importorskip("peft")
    from steps.config import LoraConfig
    from steps.train.adapters import apply_lora

    train_ex, dev_ex = kto_data
    cfg = PreferenceConfig(
        lr=1e-2, max_num_tokens=400, max_steps=2, seed=3, lora=LoraConfig(enabled=True, r=4, alpha=8)
    )
    loss = build_loss("kto", beta=0.5)
    policy = apply_lora(tiny_model_factory(seed=6), cfg)
    live = UnpairedObjective(train_ex, dev_ex, tokenizer.pad_token_id, cfg, loss, References(from_policy=True))
    result = train(policy, live, cfg, tmp_path, desc="kto-lora")
    assert result.history[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # adapters start at zero: policy = base
    pre = UnpairedObjective(copy.deepcopy(train_ex), copy.deepcopy(dev_ex), tokenizer.pad_token_id, cfg, loss)
    pre.precompute_reference(tiny_model_factory(seed=6))  # the untouched base
    trained = live.evaluate(result.model)
    assert trained["dev_loss"] != pytest.approx(0.5, abs=1e-4)  # the adapters moved
    assert trained == pytest.approx(pre.evaluate(result.model), abs=1e-5)


def test_plan_is_fixed_across_epochs_and_the_cache_round_trips(tokenizer, kto_data):
    train_ex, _ = kto_data
    cfg = PreferenceConfig(max_num_tokens=400, seed=3)
    obj = UnpairedObjective(train_ex, [], tokenizer.pad_token_id, cfg, build_loss("kto"))
    first, second = obj.epoch_plan(0), obj.epoch_plan(1)
    assert first != second and sorted(map(sorted, first)) == sorted(map(sorted, second))
    assert sorted(i for b in first for i in b) == list(range(32))
    assert make_batches(train_ex, 400, 3, 0, 1, shuffle=False) == obj._membership
    for i, e in enumerate(train_ex):
        e.reference, e.reference_kl = -1.0 - i, -2.0 - i
    cache = reference_cache(train_ex)
    fresh = copy.deepcopy(train_ex)
    for e in fresh:
        e.reference = e.reference_kl = None
    fresh[0].kl_partner = "someone else"  # a changed partner invalidates only that KL score
    assert apply_reference_cache(fresh, cache) == 31
    assert fresh[0].reference == -1.0 and fresh[0].reference_kl is None and fresh[1].reference_kl == -3.0
    with pytest.raises(ValueError, match="max_batch_examples = 1"):
        UnpairedObjective(train_ex, [], 0, PreferenceConfig(max_batch_examples=1), build_loss("kto"))
    with pytest.raises(ValueError, match="data_kind 'unpaired'"):
        UnpairedObjective(train_ex, [], 0, cfg, build_loss("dpo"))


# ---------------------------------------------------------------- two gloo ranks

WORLD = 2


def _run(rank: int, world_size: int, init_file: str, out_dir: str, grad_accum: int, sync_kl: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=90),
        )
    from steps.models import load_model, load_tokenizer
    from steps.train import collectives

    tok = load_tokenizer("tiny")
    examples, _ = tokenize_unpaired(kto_rows(TOPICS_TRAIN), tok, 256)
    cfg = PreferenceConfig(lr=2e-3, max_num_tokens=150, epochs=1, grad_accum=grad_accum, seed=3, dev_every_epoch=False)
    model = load_model("tiny", seed=4)
    obj = UnpairedObjective(examples, [], tok.pad_token_id, cfg, build_loss("kto", beta=0.1), sync_kl=sync_kl)
    obj.precompute_reference(model)
    result = train(model, obj, cfg, Path(out_dir) / f"rank{rank}", resume=False)
    record = {
        "batches": obj.epoch_batch_count(0),
        "history": [{k: h[k] for k in ("loss", "kl", "rewards_desirable", "grad_norm")} for h in result.history],
        "collectives": {what: n for (what, _), n in collectives.CALLS.items()},
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    if world_size > 1:
        torch.distributed.destroy_process_group()


def _spawn(tmp_path: Path, name: str, grad_accum: int, sync_kl: bool) -> list[dict]:
    out = tmp_path / name
    ctx = mp.get_context("spawn")
    args = (str(tmp_path / f"init-{name}"), str(out), grad_accum, sync_kl)
    procs = [ctx.Process(target=_run, args=(r, WORLD, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_gloo_ranks(tmp_path):
    """Without the KL all-reduce, 2 ranks x A micro-batches take the steps of 1 process x 2A. With it, the ranks
    still agree and finish although the last step gives them unequal shares (the padding all-reduces)."""
    _run(0, 1, "", str(tmp_path / "single"), 2 * 2, False)
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    plain = _spawn(tmp_path, "plain", 2, False)
    assert plain[0]["history"] == plain[1]["history"]
    assert [h["loss"] for h in plain[0]["history"]] == pytest.approx([h["loss"] for h in single["history"]], abs=1e-5)
    assert [h["kl"] for h in plain[0]["history"]] == pytest.approx([h["kl"] for h in single["history"]], abs=1e-5)
    synced = _spawn(tmp_path, "synced", 2, True)
    batches = synced[0]["batches"]
    assert batches % 4 == 3, f"{batches} micro-batches: the last step must deal 3 (uneven shares: 2 and 1)"
    assert synced[0]["history"] == synced[1]["history"] and len(synced[0]["history"]) == -(-batches // 4)
    assert synced[0]["collectives"]["KTO KL rows"] == synced[1]["collectives"]["KTO KL rows"]
    assert all(math.isfinite(h["loss"]) and h["kl"] >= 0 for h in synced[0]["history"])
