"""Training engine: log-probs, batching, gradient accumulation, learning, resume, divergence."""

from __future__ import annotations

import math

import pytest
import torch

from steps.config import PreferenceConfig, SFTConfig
from steps.losses import build_loss
from steps.train.batching import PairExample, SFTExample, collate_pairs, collate_sft, make_batches, tokenize_sft
from steps.train.logprobs import sequence_logprobs
from steps.train.loop import TrainingDivergedError, lr_lambda, make_optimizer, optimizer_step, train
from steps.train.objectives import PreferenceObjective, SFTObjective, precompute_reference
from tests.faults import stop_after_checkpoint

TOPICS_TRAIN = [
    "apples",
    "rivers",
    "music",
    "trains",
    "gardens",
    "books",
    "clouds",
    "bridges",
    "coffee",
    "maps",
    "candles",
    "forests",
    "oceans",
    "bicycles",
    "lamps",
    "violins",
]
TOPICS_DEV = ["mountains", "kites", "windows", "pianos", "tigers", "castles"]


def sft_rows(topics):
    return [
        {
            "id": f"s{i}",
            "prompt": [{"role": "user", "content": f"Tell me about {t}."}],
            "response": f"{t.capitalize()} are wonderful and helpful, and people enjoy them every day.",
        }
        for i, t in enumerate(topics)
    ]


def pair_rows(topics):
    return [
        {
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": f"Describe {t}."}],
            "chosen": f"{t.capitalize()} are wonderful and helpful.",
            "rejected": f"{t.capitalize()} are terrible and useless.",
        }
        for i, t in enumerate(topics)
    ]


def pairs_from_rows(tokenizer, rows):
    from steps.chat import encode_prompt_response

    out = []
    for r in rows:
        p, c = encode_prompt_response(tokenizer, r["prompt"], r["chosen"])
        _, j = encode_prompt_response(tokenizer, r["prompt"], r["rejected"])
        out.append(PairExample(r["id"], p, c, j))
    return out


def test_sequence_logprobs_match_full_softmax(tokenizer, tiny_model_factory):
    model = tiny_model_factory(seed=3)
    examples, _ = tokenize_sft(sft_rows(TOPICS_TRAIN[:3]), tokenizer, 256)
    batch = collate_sft(examples, tokenizer.pad_token_id)
    sums, counts = sequence_logprobs(model, batch, chunk_rows=7)  # chunks that don't divide the row count
    # independent: full logits, log_softmax, gather, sum over the response positions of each row
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    for i, ex in enumerate(examples):
        seq = ex.prompt_ids + ex.response_ids
        expect = sum(float(logp[i, t - 1, seq[t]]) for t in range(len(ex.prompt_ids), len(seq)))
        assert counts[i] == len(ex.response_ids)
        assert float(sums[i]) == pytest.approx(expect, rel=1e-5, abs=1e-4)


def test_batches_respect_token_budget_and_are_deterministic():
    examples = [SFTExample(str(i), [1] * (5 + i % 7), [2] * (3 + i % 11)) for i in range(60)]
    b1 = make_batches(examples, 64, seed=1, epoch=0)
    assert b1 == make_batches(examples, 64, seed=1, epoch=0)
    assert b1 != make_batches(examples, 64, seed=1, epoch=1)
    assert sorted(i for b in b1 for i in b) == list(range(60))
    for b in b1:
        assert max(examples[i].length for i in b) * len(b) <= 64
    pairs = [PairExample(str(i), [1] * 4, [2] * (i % 5 + 1), [3] * 2) for i in range(20)]
    for b in make_batches(pairs, 40, seed=0, epoch=0, rows_per_example=2):
        assert 2 * len(b) * max(pairs[i].length for i in b) <= 40


def test_overlength_drop_and_truncate_are_counted(tokenizer):
    rows = sft_rows(TOPICS_TRAIN[:4])
    rows[1]["response"] = "word " * 400
    kept, stats = tokenize_sft(rows, tokenizer, 64, "drop")
    assert (stats.kept, stats.dropped_overlength, stats.truncated) == (3, 1, 0)
    kept, stats = tokenize_sft(rows, tokenizer, 64, "truncate")
    assert (stats.kept, stats.dropped_overlength, stats.truncated) == (4, 0, 1)
    assert max(e.length for e in kept) <= 64


def test_cosine_schedule_with_warmup_by_hand():
    cfg = SFTConfig(lr=1.0, final_lr=0.1, warmup_steps=2, schedule="cosine")
    f = lr_lambda(cfg, total_steps=12)
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway through the decay
    assert f(12) == pytest.approx(0.1)
    lin = lr_lambda(SFTConfig(lr=1.0, final_lr=0.0, schedule="linear"), total_steps=10)
    assert lin(5) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_grad_accumulation_matches_one_big_batch(tokenizer, tiny_model_factory, kind):
    if kind == "sft":
        examples, _ = tokenize_sft(sft_rows(TOPICS_TRAIN[:4]), tokenizer, 256)
        cfg = SFTConfig(lr=1e-3, weight_decay=0.1)
        obj = SFTObjective(examples, [], tokenizer.pad_token_id, cfg)
        whole = [collate_sft(examples, tokenizer.pad_token_id)]
        halves = [collate_sft(examples[:2], tokenizer.pad_token_id), collate_sft(examples[2:], tokenizer.pad_token_id)]
    else:
        examples = pairs_from_rows(tokenizer, pair_rows(TOPICS_TRAIN[:4]))
        for i, e in enumerate(examples):
            e.reference_chosen, e.reference_rejected = -30.0 - i, -31.0 + i
        cfg = PreferenceConfig(lr=1e-3)
        obj = PreferenceObjective(examples, [], tokenizer.pad_token_id, cfg, build_loss("dpo", beta=0.1), True)
        whole = [collate_pairs(examples, tokenizer.pad_token_id)]
        halves = [
            collate_pairs(examples[:2], tokenizer.pad_token_id),
            collate_pairs(examples[2:], tokenizer.pad_token_id),
        ]
    results = []
    for micro_batches in (whole, halves):
        model = tiny_model_factory(seed=11)
        opt = make_optimizer(model, cfg)
        stats = optimizer_step(model, opt, obj, micro_batches, max_grad_norm=1.0, step=0)
        results.append((stats, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (s1, w1), (s2, w2) = results
    assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-5)
    assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-4)
    assert torch.max(torch.abs(w1 - w2)).item() < 1e-5


def _dev_loss(model, obj):
    return obj.evaluate(model)["dev_loss"]


def test_sft_lowers_dev_loss(tokenizer, tiny_model_factory, tmp_path):
    train_ex, _ = tokenize_sft(sft_rows(TOPICS_TRAIN), tokenizer, 256)
    dev_ex, _ = tokenize_sft(sft_rows(TOPICS_DEV), tokenizer, 256)
    cfg = SFTConfig(lr=5e-3, final_lr=5e-4, warmup_steps=0, max_num_tokens=512, epochs=10, seed=5, weight_decay=0.0)
    model = tiny_model_factory(seed=0)
    obj = SFTObjective(train_ex, dev_ex, tokenizer.pad_token_id, cfg)
    before = _dev_loss(model, obj)
    result = train(model, obj, cfg, tmp_path, desc="sft-test")
    after = result.dev_history[-1]["dev_loss"]
    assert before > 10.0  # ~ln(49152) for a random model
    assert after < before - 3.0, (before, after)


def test_dpo_raises_dev_reward_accuracy(tokenizer, tiny_model_factory, tmp_path):
    train_pairs = pairs_from_rows(tokenizer, pair_rows(TOPICS_TRAIN))
    dev_pairs = pairs_from_rows(tokenizer, pair_rows(TOPICS_DEV))
    cfg = PreferenceConfig(lr=2e-3, final_lr=2e-4, max_num_tokens=1024, epochs=4, seed=5, weight_decay=0.0)
    model = tiny_model_factory(seed=1)
    precompute_reference(model, train_pairs + dev_pairs, tokenizer.pad_token_id, cfg)
    obj = PreferenceObjective(train_pairs, dev_pairs, tokenizer.pad_token_id, cfg, build_loss("dpo", beta=0.1), True)
    before = obj.evaluate(model)
    assert before["dev_reward_margin"] == pytest.approx(0.0, abs=1e-3)  # the policy is its own reference
    result = train(model, obj, cfg, tmp_path, desc="dpo-test")
    after = result.dev_history[-1]
    assert after["dev_reward_accuracy"] >= 0.8, after
    assert after["dev_reward_margin"] > 0.05 and after["dev_loss"] < math.log(2) - 0.02, after


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_mid_epoch_gives_identical_weights(tokenizer, tiny_model_factory, tmp_path):
    train_ex, _ = tokenize_sft(sft_rows(TOPICS_TRAIN), tokenizer, 256)
    cfg = SFTConfig(
        lr=1e-3, max_num_tokens=256, epochs=2, seed=9, checkpoint_every_steps=1, warmup_steps=1, dev_every_epoch=False
    )
    steps_per_epoch = len(make_batches(train_ex, 256, 9, 0))
    assert steps_per_epoch >= 3

    ref_model = tiny_model_factory(seed=2)
    train(ref_model, SFTObjective(train_ex, [], tokenizer.pad_token_id, cfg), cfg, tmp_path / "a")

    model = tiny_model_factory(seed=2)
    with pytest.raises(KeyboardInterrupt), stop_after_checkpoint(steps_per_epoch // 2):
        train(model, SFTObjective(train_ex, [], tokenizer.pad_token_id, cfg), cfg, tmp_path / "b")
    fresh = tiny_model_factory(seed=77)  # a new process would start from different memory
    result = train(fresh, SFTObjective(train_ex, [], tokenizer.pad_token_id, cfg), cfg, tmp_path / "b")
    assert result.resumed_from is not None
    a, b = _weights(ref_model), _weights(fresh)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps_logged = [r["step"] for r in result.history]
    assert steps_logged == list(range(1, len(steps_logged) + 1))


class _NaNAfter(SFTObjective):
    def __init__(self, *a, bad_step: int, **kw):
        super().__init__(*a, **kw)
        self.bad_step, self.calls = bad_step, 0

    def step_denominator(self, micro_batches):
        self.calls += 1
        d = super().step_denominator(micro_batches)
        return 0.0 if self.calls == self.bad_step else d  # loss/0 -> inf


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tokenizer, tiny_model_factory, tmp_path):
    train_ex, _ = tokenize_sft(sft_rows(TOPICS_TRAIN), tokenizer, 256)
    cfg = SFTConfig(lr=1e-3, max_num_tokens=256, epochs=1, checkpoint_every_steps=1, dev_every_epoch=False)
    obj = _NaNAfter(train_ex, [], tokenizer.pad_token_id, cfg, bad_step=3)
    with pytest.raises(TrainingDivergedError) as err:
        train(tiny_model_factory(), obj, cfg, tmp_path)
    msg = str(err.value)
    assert "optimizer step 3" in msg and "step_0000002" in msg
    assert (tmp_path / "checkpoints" / "step_0000002" / "COMPLETE").exists()
    assert not (tmp_path / "checkpoints" / "step_0000003").exists()


def test_lora_trains_adapters_only_resumes_and_saves_a_merged_model(tokenizer, tiny_model_factory, tmp_path):
    pytest.importorskip("peft")
    from steps.config import LoraConfig
    from steps.models import load_model
    from steps.train.checkpoints import save_model_dir
    from steps.train.recipes import apply_lora

    train_ex, _ = tokenize_sft(sft_rows(TOPICS_TRAIN), tokenizer, 256)
    cfg = SFTConfig(
        lr=1e-2,
        max_num_tokens=256,
        epochs=1,
        seed=4,
        checkpoint_every_steps=1,
        dev_every_epoch=False,
        lora=LoraConfig(enabled=True, r=4, alpha=8),
    )
    base = tiny_model_factory(seed=5)
    base_weights = _weights(base)
    ref = apply_lora(tiny_model_factory(seed=5), cfg)
    train(ref, SFTObjective(train_ex, [], tokenizer.pad_token_id, cfg), cfg, tmp_path / "a")
    trainable = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    model = apply_lora(tiny_model_factory(seed=5), cfg)
    with pytest.raises(KeyboardInterrupt), stop_after_checkpoint(2):
        train(model, SFTObjective(train_ex, [], tokenizer.pad_token_id, cfg), cfg, tmp_path / "b")
    resumed = apply_lora(tiny_model_factory(seed=5), cfg)
    train(resumed, SFTObjective(train_ex, [], tokenizer.pad_token_id, cfg), cfg, tmp_path / "b")
    a, b = _weights(ref), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    merged_dir = save_model_dir(resumed, tokenizer, tmp_path / "final")
    merged = load_model(str(merged_dir))
    changed = [k for k, v in _weights(merged).items() if k in base_weights and not torch.equal(v, base_weights[k])]
    assert changed and all(("q_proj" in k or "k_proj" in k or "v_proj" in k or "o_proj" in k) for k in changed)
