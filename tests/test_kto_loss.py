"""KTO against the formula written out here with ``math`` (and TRL's layout of it, in numpy), to 1e-6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from steps.losses import (
    DATA_KINDS,
    LossConfigError,
    LossInputError,
    MissingReferenceError,
    UnpairedLoss,
    build_loss,
    data_kind,
    loss_class,
    registered_losses,
    requires_reference,
)
from steps.losses.kto import kl_from_sums, kl_row_sums


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(values, grad=False, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


# Four examples: policy sums S, reference sums R, labels; three KL rows (policy S', reference R').
S = [-10.0, -20.0, -7.0, -12.0]
R = [-11.0, -19.0, -9.0, -12.5]
LABELS = [True, False, True, False]
S_KL = [-30.0, -25.0, -18.0]
R_KL = [-30.5, -25.2, -18.6]  # mean(S' − R') = (0.5 + 0.2 + 0.6) / 3 = 0.4333...


def hand_kto(s, r, labels, s_kl, r_kl, beta, w_d, w_u, kl=None):
    """Per-example losses, rewards and the KL of Ethayarajh et al. (2024), eq. (7) as TRL computes it."""
    if kl is None:  # the mean over the KL rows, 0 without any
        kl = sum(a - b for a, b in zip(s_kl, r_kl)) / len(s_kl) if s_kl else 0.0
    kl = max(0.0, kl)
    losses, rewards = [], []
    for si, ri, desirable in zip(s, r, labels):
        ratio = si - ri
        rewards.append(beta * ratio)
        if desirable:
            losses.append(w_d * (1.0 - sigmoid(beta * (ratio - kl))))
        else:
            losses.append(w_u * (1.0 - sigmoid(beta * (kl - ratio))))
    return losses, rewards, kl


def trl_layout_mean(s, r, labels, s_kl, r_kl, beta, w_d, w_u):
    """TRL's kto_loss: chosen then rejected losses concatenated, weighted, nanmean (numpy, fp64)."""
    s, r, lab = np.array(s), np.array(r), np.array(labels)
    kl = max(float(np.mean(np.array(s_kl) - np.array(r_kl))), 0.0)
    chosen = 1.0 - 1.0 / (1.0 + np.exp(-beta * ((s[lab] - r[lab]) - kl)))
    rejected = 1.0 - 1.0 / (1.0 + np.exp(-beta * (kl - (s[~lab] - r[~lab]))))
    return float(np.nanmean(np.concatenate([w_d * chosen, w_u * rejected])))


def run(loss, s=S, r=R, labels=LABELS, s_kl=S_KL, r_kl=R_KL, grad=False, **kw):
    logps = t(s, grad=grad)
    out = loss.unpaired(
        logps,
        torch.tensor(labels),
        None if r is None else t(r),
        None if s_kl is None else t(s_kl),
        None if r_kl is None else t(r_kl),
        **kw,
    )
    return out, logps


@pytest.mark.parametrize(("beta", "w_d", "w_u"), [(0.1, 1.0, 1.0), (0.5, 1.33, 0.7), (2.0, 0.0, 1.0)])
def test_kto_matches_the_formula_with_weights(beta, w_d, w_u):
    out, _ = run(build_loss("kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u))
    losses, rewards, kl = hand_kto(S, R, LABELS, S_KL, R_KL, beta, w_d, w_u)
    assert kl == pytest.approx(0.4333333333, abs=1e-9)
    assert out.per_example.tolist() == pytest.approx(losses, abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(losses) / 4, abs=1e-6)
    assert out.loss.item() == pytest.approx(trl_layout_mean(S, R, LABELS, S_KL, R_KL, beta, w_d, w_u), abs=1e-6)
    assert out.rewards.tolist() == pytest.approx(rewards, abs=1e-9)
    assert float(out.kl) == pytest.approx(kl, abs=1e-9) and out.kl_rows == 3
    m = out.metrics
    assert m["loss"] == pytest.approx(sum(losses) / 4, abs=1e-6)
    assert m["kl"] == pytest.approx(kl, abs=1e-9)
    assert m["rewards_desirable"] == pytest.approx((rewards[0] + rewards[2]) / 2, abs=1e-9)
    assert m["rewards_undesirable"] == pytest.approx((rewards[1] + rewards[3]) / 2, abs=1e-9)
    assert m["reward_margin"] == pytest.approx(m["rewards_desirable"] - m["rewards_undesirable"], abs=1e-12)
    assert (m["count_desirable"], m["count_undesirable"]) == (2.0, 2.0)
    # reference point β·KL: ratios 1 (desirable, above 0.433), -1 (undesirable, below), 2 (above), 0.5 (not below)
    assert m["reward_accuracy"] == 0.75


def test_the_kl_is_clamped_at_zero():
    negative_kl = [-31.0, -26.0, -19.0]  # S' − R' = −0.5, −0.8, −0.4: mean < 0 -> KL = 0
    out, _ = run(build_loss("kto", beta=0.1), s_kl=negative_kl)
    losses, _, kl = hand_kto(S, R, LABELS, negative_kl, R_KL, 0.1, 1.0, 1.0)
    assert kl == 0.0 and float(out.kl) == 0.0
    assert out.per_example.tolist() == pytest.approx(losses, abs=1e-6)
    # KL = 0: the desirable loss is 1 − σ(β r), the undesirable 1 − σ(−β r)
    assert out.per_example[0].item() == pytest.approx(1 - sigmoid(0.1 * 1.0), abs=1e-9)
    assert out.per_example[1].item() == pytest.approx(1 - sigmoid(0.1 * 1.0), abs=1e-9)


def test_gradients_flow_through_the_policy_completions_only():
    beta, w_d, w_u = 0.5, 1.2, 0.8
    loss = build_loss("kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    logps, ref = t(S, grad=True), t(R, grad=True)
    kl_logps, ref_kl = t(S_KL, grad=True), t(R_KL, grad=True)
    out = loss.unpaired(logps, torch.tensor(LABELS), ref, kl_logps, ref_kl)
    out.loss.backward()
    kl = sum(a - b for a, b in zip(S_KL, R_KL)) / 3
    expected = []
    for s, r, desirable in zip(S, R, LABELS):
        # d/dS of w(1 − σ(z)) = −w σ(z)(1 − σ(z)) dz/dS; z = β(r − KL) (desirable) or β(KL − r) (undesirable)
        z = beta * ((s - r) - kl) if desirable else beta * (kl - (s - r))
        w, sign = (w_d, 1.0) if desirable else (w_u, -1.0)
        expected.append(-w * sigmoid(z) * (1 - sigmoid(z)) * beta * sign / 4)
    assert logps.grad.tolist() == pytest.approx(expected, abs=1e-9)
    assert ref.grad is None and kl_logps.grad is None and ref_kl.grad is None


def test_gradcheck_against_finite_differences():
    loss = build_loss("kto", beta=0.7, desirable_weight=1.5, undesirable_weight=0.5)
    labels, ref, s_kl, r_kl = torch.tensor(LABELS), t(R), t(S_KL), t(R_KL)
    logps = t(S, grad=True)
    assert torch.autograd.gradcheck(lambda x: loss.unpaired(x, labels, ref, s_kl, r_kl).loss, (logps,))


def test_all_desirable_and_all_undesirable_batches():
    loss = build_loss("kto", beta=0.1)
    for labels in ([True] * 4, [False] * 4):
        out, _ = run(loss, labels=labels)
        losses, rewards, _ = hand_kto(S, R, labels, S_KL, R_KL, 0.1, 1.0, 1.0)
        assert out.per_example.tolist() == pytest.approx(losses, abs=1e-6)
        present, absent = ("rewards_desirable", "rewards_undesirable")[:: 1 if labels[0] else -1]
        assert out.metrics[present] == pytest.approx(sum(rewards) / 4, abs=1e-9)
        assert absent not in out.metrics and "reward_margin" not in out.metrics
        assert out.metrics["count_desirable"] == (4.0 if labels[0] else 0.0)


def test_a_batch_of_one_has_no_kl_rows_and_uses_kl_zero_or_the_one_passed_in():
    loss = build_loss("kto", beta=0.1)
    out, _ = run(loss, s=[-10.0], r=[-11.0], labels=[True], s_kl=[], r_kl=[])
    assert float(out.kl) == 0.0 and out.kl_rows == 0
    assert out.per_example.tolist() == pytest.approx([1 - sigmoid(0.1 * 1.0)], abs=1e-9)
    # the trainer's estimate over every rank (here 0.3) replaces the batch's own (clamped like it)
    out, _ = run(loss, s=[-10.0], r=[-11.0], labels=[True], s_kl=[], r_kl=[], kl=torch.tensor(0.3))
    assert out.per_example.item() == pytest.approx(1 - sigmoid(0.1 * (1.0 - 0.3)), abs=1e-9) and out.kl_rows == 0
    out, _ = run(loss, kl=torch.tensor(-2.0))
    assert float(out.kl) == 0.0
    with pytest.raises(LossInputError, match="KL rows"):
        run(loss, s_kl=None, r_kl=None)


def test_kl_sums_give_the_row_weighted_mean_over_ranks():
    # rank 0 holds rows 0-1, rank 1 row 2: the all-reduced sums give the mean over all three rows
    rank0 = kl_row_sums(t(S_KL[:2]), t(R_KL[:2]))
    rank1 = kl_row_sums(t(S_KL[2:]), t(R_KL[2:]))
    assert rank0.tolist() == pytest.approx([0.7, 2.0]) and rank1.tolist() == pytest.approx([0.6, 1.0])
    assert float(kl_from_sums(rank0 + rank1)) == pytest.approx(1.3 / 3, abs=1e-7)
    assert kl_from_sums(torch.zeros(2, dtype=torch.float64)) is None


def test_inputs_are_checked():
    loss = build_loss("kto")
    with pytest.raises(MissingReferenceError, match="reference_logps"):
        run(loss, r=None)
    with pytest.raises(LossInputError, match="bool"):
        loss.unpaired(t(S), torch.tensor([1, 0, 1, 0]), t(R), t(S_KL), t(R_KL))
    with pytest.raises(LossInputError, match="labels has 3 entries"):
        loss.unpaired(t(S), torch.tensor(LABELS[:3]), t(R), t(S_KL), t(R_KL))
    with pytest.raises(LossInputError, match="pass both KL-row sums"):
        run(loss, r_kl=None)
    with pytest.raises(LossInputError, match="empty"):
        run(loss, s=[], r=[], labels=[])
    with pytest.raises(LossInputError, match="finite"):
        run(loss, kl=torch.tensor(float("nan")))


def test_bf16_inputs_are_computed_in_fp32():
    loss = build_loss("kto", beta=0.1)
    logps = torch.tensor(S, dtype=torch.bfloat16, requires_grad=True)
    ref, kl, ref_kl = (torch.tensor(v, dtype=torch.bfloat16) for v in (R, S_KL, R_KL))
    out = loss.unpaired(logps, torch.tensor(LABELS), ref, kl, ref_kl)
    assert out.per_example.dtype == torch.float32
    out.loss.backward()
    assert logps.grad is not None and logps.grad.dtype == torch.bfloat16


def test_kto_is_registered_as_an_unpaired_loss_and_refuses_pairs():
    assert "kto" in registered_losses() and requires_reference("kto")
    assert data_kind("kto") == "unpaired" and data_kind("dpo") == "pairs" and DATA_KINDS == ("pairs", "unpaired")
    assert issubclass(loss_class("kto"), UnpairedLoss)
    assert {name for name in registered_losses() if data_kind(name) == "unpaired"} == {"kto"}
    with pytest.raises(LossInputError, match="unpaired feedback"):
        build_loss("kto")(t([-1.0]), t([-2.0]), torch.tensor([1]), torch.tensor([1]), t([-1.0]), t([-2.0]))


def test_config_defaults_and_checks():
    config = build_loss("kto").config
    assert (config.beta, config.desirable_weight, config.undesirable_weight) == (0.1, 1.0, 1.0)
    assert build_loss("kto", beta=1, desirable_weight=2).config.desirable_weight == 2.0
    for fields, field in (
        ({"beta": 0.0}, "beta"),
        ({"desirable_weight": -1.0}, "desirable_weight"),
        ({"undesirable_weight": float("inf")}, "undesirable_weight"),
        ({"desirable_weight": 0.0, "undesirable_weight": 0.0}, "desirable_weight"),
        ({"beta": "5e-7"}, "beta"),
    ):
        with pytest.raises(LossConfigError) as info:
            build_loss("kto", **fields)
        assert info.value.field == field


def test_the_config_layer_plans_kto_runs_and_sweeps(tmp_path):
    from steps.config import config_from_dict
    from steps.config.plan import plan_variants
    from steps.losses.kto import KTOConfig

    cfg = config_from_dict({"preference": {"per_loss": {"kto": {"criterion_config": {"undesirable_weight": 1.5}}}}})
    plan = plan_variants(cfg, "dpo,kto")
    assert plan.losses == ["dpo", "kto"]
    kto = next(v for v in plan.variants if v.variant.loss == "kto").config.preference
    assert kto.criterion == "kto" and kto.criterion_config == KTOConfig(undesirable_weight=1.5)
    sweep = tmp_path / "kto.yaml"
    sweep.write_text(
        "loss: kto\ngrid:\n  criterion_config.desirable_weight: [1.0, 1.33]\n  criterion_config.beta: [0.1]\n"
    )
    points = [v for v in plan_variants(cfg, "", str(sweep)).variants if v.variant.loss == "kto"]
    assert [v.variant.name for v in points] == ["kto-desirable_weight1-beta0.1", "kto-desirable_weight1.33-beta0.1"]
    assert points[1].config.preference.criterion_config == KTOConfig(desirable_weight=1.33, undesirable_weight=1.5)


def test_a_loss_must_declare_a_known_data_kind(monkeypatch):
    from dataclasses import dataclass

    from steps.losses import PreferenceLoss, register_loss, registry

    monkeypatch.setattr(registry, "_LOSSES", dict(registry._LOSSES))

    @dataclass
    class Config:
        beta: float = 0.1

    class Triples(PreferenceLoss):
        config_class = Config
        data_kind = "triples"

    with pytest.raises(TypeError, match=r"data_kind = 'triples'; must be one of \('pairs', 'unpaired'\)"):
        register_loss("tmp-triples")(Triples)
    assert "tmp-triples" not in registered_losses()
