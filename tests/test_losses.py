"""Preference losses checked against numbers worked out here with ``math`` on small hand-made pairs."""

import dataclasses
import importlib
import math
import sys
import textwrap

import pytest
import torch

from steps.losses import (
    DuplicateLossError,
    LossConfigError,
    LossInputError,
    MissingReferenceError,
    PreferenceLoss,
    UnknownLossError,
    build_loss,
    import_loss_modules,
    loss_class,
    register_loss,
    registered_losses,
    registry,
    requires_reference,
)

REQUIRED_METRICS = {"loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "nll"}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def neg_logsigmoid(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x})."""
    return math.log1p(math.exp(-x))


def t(values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


# Two hand-made pairs used by the reference-based losses.
#   pair 0: S_w = -10 (5 tokens), S_l = -12 (6 tokens), R_w = -11, R_l = -11.5
#   pair 1: S_w = -20 (10 tokens), S_l = -15 (7 tokens), R_w = -19, R_l = -16
S_W, S_L = [-10.0, -20.0], [-12.0, -15.0]
N_W, N_L = [5, 10], [6, 7]
R_W, R_L = [-11.0, -19.0], [-11.5, -16.0]


def call(loss_fn, s_w=S_W, s_l=S_L, n_w=N_W, n_l=N_L, r_w=R_W, r_l=R_L, grad=False):
    chosen, rejected = t(s_w, grad=grad), t(s_l, grad=grad)
    out = loss_fn(
        chosen,
        rejected,
        torch.tensor(n_w),
        torch.tensor(n_l),
        None if r_w is None else t(r_w),
        None if r_l is None else t(r_l),
    )
    return out, chosen, rejected


# ---------------------------------------------------------------- DPO


def test_dpo_plain_values_and_metrics():
    out, _, _ = call(build_loss("dpo", beta=0.1))
    # z0 = 0.1 * ((-10 - -11) - (-12 - -11.5)) = 0.1 * (1 + 0.5) = 0.15
    # z1 = 0.1 * ((-20 - -19) - (-15 - -16)) = 0.1 * (-1 - 1) = -0.2
    expected = [neg_logsigmoid(0.15), neg_logsigmoid(-0.2)]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-12)
    m = out.metrics
    assert set(m) >= REQUIRED_METRICS and all(isinstance(v, float) for v in m.values())
    # rewards β(S − R): chosen [0.1, -0.1], rejected [-0.05, 0.1]
    assert m["rewards_chosen"] == pytest.approx(0.0, abs=1e-12)
    assert m["rewards_rejected"] == pytest.approx(0.025)
    assert m["reward_margin"] == pytest.approx((0.15 + -0.2) / 2)
    assert m["reward_accuracy"] == 0.5  # pair 0 right, pair 1 wrong
    assert m["nll"] == pytest.approx((10 / 5 + 20 / 10) / 2)  # NLL = −S_w/|y_w|
    assert m["logits"] == pytest.approx((0.15 - 0.2) / 2)
    assert m["loss"] == pytest.approx(out.loss.item())


def test_dpo_label_smoothing_0_2():
    out, _, _ = call(build_loss("dpo", beta=0.1, label_smoothing=0.2))
    expected = [0.8 * neg_logsigmoid(z) + 0.2 * neg_logsigmoid(-z) for z in (0.15, -0.2)]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)


def test_dpo_length_normalization_uses_means():
    out, _, _ = call(build_loss("dpo", beta=0.5, length_normalization=True))
    z0 = 0.5 * ((-10 / 5 - -11 / 5) - (-12 / 6 - -11.5 / 6))  # 0.5 * (0.2 + 1/12)
    z1 = 0.5 * ((-20 / 10 - -19 / 10) - (-15 / 7 - -16 / 7))  # 0.5 * (-0.1 - 1/7)
    assert out.per_pair.tolist() == pytest.approx([neg_logsigmoid(z0), neg_logsigmoid(z1)], rel=1e-12)
    assert out.metrics["rewards_chosen"] == pytest.approx(0.5 * (0.2 + -0.1) / 2)


def test_dpo_nll_term():
    out, _, _ = call(build_loss("dpo", beta=0.1, nll_scale=0.5))
    expected = [neg_logsigmoid(0.15) + 0.5 * 2.0, neg_logsigmoid(-0.2) + 0.5 * 2.0]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)


def test_dpo_gradient_matches_hand_derivation():
    beta, eps, nll_scale = 0.1, 0.2, 0.5
    out, chosen, rejected = call(build_loss("dpo", beta=beta, label_smoothing=eps, nll_scale=nll_scale), grad=True)
    out.loss.backward()
    batch = 2
    # dℓ/dS_w = −β(1−ε)σ(−z) + βεσ(z) − nll_scale/|y_w|;  dℓ/dS_l = β(1−ε)σ(−z) − βεσ(z); mean over B pairs.
    grad_w = [
        (-beta * (1 - eps) * sigmoid(-z) + beta * eps * sigmoid(z) - nll_scale / n) / batch
        for z, n in ((0.15, 5), (-0.2, 10))
    ]
    grad_l = [(beta * (1 - eps) * sigmoid(-z) - beta * eps * sigmoid(z)) / batch for z in (0.15, -0.2)]
    assert chosen.grad.tolist() == pytest.approx(grad_w, rel=1e-10)
    assert rejected.grad.tolist() == pytest.approx(grad_l, rel=1e-10)


# ---------------------------------------------------------------- SimPO, CPO, ORPO (reference-free)

# A_w = [-3/3, -4/8] = [-1, -0.5]; A_l = [-4/2, -2/4] = [-2, -0.5]
FREE = dict(s_w=[-3.0, -4.0], n_w=[3, 8], s_l=[-4.0, -2.0], n_l=[2, 4], r_w=None, r_l=None)


def test_simpo_gamma_is_the_papers_margin():
    for gamma in (0.5, 1.0):
        out, _, _ = call(build_loss("simpo", beta=2.0, gamma=gamma), **FREE)
        # z = β(A_w − A_l) − γ: pair 0 → 2·1 − γ, pair 1 → 2·0 − γ
        expected = [neg_logsigmoid(2.0 - gamma), neg_logsigmoid(-gamma)]
        assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)
        assert out.metrics["rewards_chosen"] == pytest.approx((2 * -1 + 2 * -0.5) / 2)  # β·A
        assert out.metrics["reward_margin"] == pytest.approx(1.0)
        assert out.metrics["logits"] == pytest.approx(1.0 - gamma)
        assert out.metrics["reward_accuracy"] == 0.5  # pair 1 ties: not counted as correct


def test_simpo_nll_term():
    out, _, _ = call(build_loss("simpo", beta=2.0, gamma=0.5, nll_scale=0.3), **FREE)
    expected = [neg_logsigmoid(1.5) + 0.3 * 1.0, neg_logsigmoid(-0.5) + 0.3 * 0.5]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)


def test_cpo_with_nll():
    out, _, _ = call(build_loss("cpo", beta=0.1, nll_scale=1.0), **FREE)
    # z = 0.1 (S_w − S_l): pair 0 → 0.1, pair 1 → −0.2; NLL = −A_w = [1, 0.5]
    expected = [neg_logsigmoid(0.1) + 1.0, neg_logsigmoid(-0.2) + 0.5]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["rewards_chosen"] == pytest.approx((-0.3 + -0.4) / 2)  # β·S
    assert out.metrics["rewards_rejected"] == pytest.approx((-0.4 + -0.2) / 2)
    assert out.metrics["reward_accuracy"] == 0.5
    no_nll, _, _ = call(build_loss("cpo", beta=0.1, nll_scale=0.0), **FREE)
    assert no_nll.per_pair.tolist() == pytest.approx([neg_logsigmoid(0.1), neg_logsigmoid(-0.2)], rel=1e-12)


def hand_log_odds(a: float) -> float:
    return a - math.log(1.0 - math.exp(a))


def test_orpo_lambda_is_honoured():
    ratio = [hand_log_odds(-1.0) - hand_log_odds(-2.0), hand_log_odds(-0.5) - hand_log_odds(-0.5)]
    assert ratio[1] == 0.0
    odds_loss = [neg_logsigmoid(r) for r in ratio]  # pair 1: log 2
    nll = [1.0, 0.5]
    losses = {}
    for lam in (0.2, 1.0):
        out, _, _ = call(build_loss("orpo", orpo_lambda=lam, nll_scale=1.0), **FREE)
        expected = [nll[i] + lam * odds_loss[i] for i in range(2)]
        assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-10)
        assert out.metrics["log_odds"] == pytest.approx(sum(ratio) / 2, rel=1e-10)
        assert out.metrics["rewards_chosen"] == pytest.approx(-0.75)  # A
        assert out.metrics["reward_accuracy"] == 0.5
        losses[lam] = out.loss.item()
    assert losses[1.0] - losses[0.2] == pytest.approx(0.8 * sum(odds_loss) / 2, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_stable_near_zero_and_very_negative(dtype):
    # chosen/rejected mean log-probs: (−1e-8, −30), (−30, −1e-8), (0, −2), (−1e-8, −1e-8)
    chosen = torch.tensor([-1e-8, -30.0, 0.0, -1e-8], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-30.0, -1e-8, -2.0, -1e-8], dtype=dtype, requires_grad=True)
    ones = torch.ones(4, dtype=torch.long)
    out = build_loss("orpo", orpo_lambda=1.0, nll_scale=1.0)(chosen, rejected, ones, ones)
    out.loss.backward()
    assert torch.isfinite(out.per_pair).all() and torch.isfinite(chosen.grad).all()
    assert torch.isfinite(rejected.grad).all()
    # mean log-probs above −1e-6 are clamped to −1e-6 (documented in steps/losses/orpo.py)
    near_zero = hand_log_odds(-1e-6)  # ≈ 13.8
    expected_pair1 = 30.0 + neg_logsigmoid(hand_log_odds(-30.0) - near_zero)  # NLL 30 + ≈ 43.8
    assert out.per_pair[1].item() == pytest.approx(expected_pair1, rel=1e-5)
    assert out.per_pair[3].item() == pytest.approx(1e-8 + math.log(2.0), rel=1e-5)


# ---------------------------------------------------------------- IPO, hinge


def test_ipo_values():
    out, _, _ = call(build_loss("ipo", beta=0.1))
    # h = (A_w − RA_w) − (A_l − RA_l), per-token means
    h0 = (-10 / 5 - -11 / 5) - (-12 / 6 - -11.5 / 6)  # 0.2 + 1/12
    h1 = (-20 / 10 - -19 / 10) - (-15 / 7 - -16 / 7)  # −0.1 − 1/7
    expected = [(h0 - 5.0) ** 2, (h1 - 5.0) ** 2]  # target 1/(2·0.1) = 5
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["reward_margin"] == pytest.approx(0.1 * (h0 + h1) / 2)
    out2, _, _ = call(build_loss("ipo", beta=0.5))  # target 1
    assert out2.per_pair.tolist() == pytest.approx([(h0 - 1.0) ** 2, (h1 - 1.0) ** 2], rel=1e-12)


def test_hinge_both_sides_and_gradient():
    out, _, _ = call(build_loss("hinge", beta=0.5), r_w=[-12.0, -19.0], r_l=[-13.0, -15.0])
    # pair 0: z0 = 0.5·((−10 + 12) − (−12 + 13)) = 0.5·1 = 0.5 → 1 − 0.5 = 0.5 (sloped side)
    # pair 1: z1 = 0.5·((−20 + 19) − (−15 + 15)) = −0.5 → 1.5 (sloped side)
    assert out.per_pair.tolist() == pytest.approx([0.5, 1.5], rel=1e-12)
    flat, c2, r2 = call(build_loss("hinge", beta=0.5), r_w=[-13.0, -19.0], r_l=[-12.0, -15.0], grad=True)
    # pair 0: (−10 + 13) − (−12 + 12) = 3 → z0 = 1.5 ≥ 1 → 0
    assert flat.per_pair.tolist() == pytest.approx([0.0, 1.5], rel=1e-12)
    flat.loss.backward()
    # flat side: no gradient; sloped side: dℓ/dS_w = −β/B, dℓ/dS_l = +β/B
    assert c2.grad.tolist() == pytest.approx([0.0, -0.25])
    assert r2.grad.tolist() == pytest.approx([0.0, 0.25])
    assert flat.metrics["reward_accuracy"] == 0.5


# ---------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo", "cpo", "ipo", "hinge"])
def test_gradcheck_every_loss_against_finite_differences(name):
    chosen = t([-10.0, -20.0, -7.0], grad=True)
    rejected = t([-12.0, -15.0, -9.0], grad=True)
    n_w, n_l = torch.tensor([5, 10, 4]), torch.tensor([6, 7, 3])
    r_w, r_l = t([-11.0, -19.0, -6.0]), t([-11.5, -16.0, -8.5])
    settings = {"dpo": {"label_smoothing": 0.1, "nll_scale": 0.3}, "hinge": {"beta": 0.1}}
    loss_fn = build_loss(name, **settings.get(name, {}))
    assert torch.autograd.gradcheck(lambda c, r: loss_fn(c, r, n_w, n_l, r_w, r_l).loss, (chosen, rejected))


def test_bf16_inputs_are_computed_in_fp32():
    chosen = torch.tensor([-10.0, -20.0], dtype=torch.bfloat16, requires_grad=True)
    rejected = torch.tensor([-12.0, -15.0], dtype=torch.bfloat16)
    out = build_loss("simpo", beta=2.0, gamma=0.5)(chosen, rejected, torch.tensor([5, 10]), torch.tensor([6, 7]))
    assert out.loss.dtype == torch.float32 and out.per_pair.dtype == torch.float32
    out.loss.backward()
    assert chosen.grad is not None and chosen.grad.dtype == torch.bfloat16


def test_reference_needs_are_declared():
    assert {name: requires_reference(name) for name in ("dpo", "ipo", "hinge", "simpo", "orpo", "cpo")} == {
        "dpo": True,
        "ipo": True,
        "hinge": True,
        "simpo": False,
        "orpo": False,
        "cpo": False,
    }


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge"])
def test_reference_based_losses_refuse_to_run_without_reference(name):
    assert build_loss(name).requires_reference
    with pytest.raises(MissingReferenceError, match="needs reference log-probs"):
        call(build_loss(name), r_w=None, r_l=None)


def test_reference_sums_come_in_pairs_and_free_losses_ignore_them():
    with pytest.raises(LossInputError, match="pass both reference sums or neither"):
        call(build_loss("dpo"), r_l=None)
    with_ref, _, _ = call(build_loss("cpo"))
    without_ref, _, _ = call(build_loss("cpo"), r_w=None, r_l=None)
    assert with_ref.loss.item() == without_ref.loss.item()


def test_bad_inputs_are_refused_clearly():
    loss_fn = build_loss("simpo")
    with pytest.raises(LossInputError, match="rejected_lengths must be > 0"):
        call(loss_fn, n_l=[6, 0], r_w=None, r_l=None)
    with pytest.raises(LossInputError, match="policy_rejected_logps has 3 entries"):
        call(loss_fn, s_l=[-1.0, -2.0, -3.0], r_w=None, r_l=None)
    with pytest.raises(LossInputError, match="float tensor"):
        loss_fn(torch.tensor([-1, -2]), torch.tensor([-1.0, -2.0]), torch.tensor([1, 1]), torch.tensor([1, 1]))
    with pytest.raises(LossInputError, match="shape"):
        loss_fn(torch.zeros(2, 1), torch.zeros(2, 1), torch.ones(2), torch.ones(2))
    with pytest.raises(LossInputError, match="empty"):
        loss_fn(torch.zeros(0), torch.zeros(0), torch.ones(0), torch.ones(0))


# ---------------------------------------------------------------- registry and configs


PROJECT_DEFAULTS = {
    "dpo": dict(beta=0.1, nll_scale=0.0, label_smoothing=0.0, length_normalization=False),
    "simpo": dict(beta=1.0, gamma=0.5, nll_scale=0.0),
    "orpo": dict(orpo_lambda=0.1, nll_scale=1.0),
    "cpo": dict(beta=0.1, nll_scale=1.0),
    "ipo": dict(beta=0.1),
    "hinge": dict(beta=0.1),
}


def test_the_six_losses_are_registered():
    assert set(registered_losses()) >= set(PROJECT_DEFAULTS)


@pytest.mark.parametrize(("name", "fields"), sorted(PROJECT_DEFAULTS.items()))
def test_defaults_are_the_projects(name, fields):
    assert dataclasses.asdict(build_loss(name).config) == fields


def test_unknown_loss_lists_registered_names():
    with pytest.raises(UnknownLossError) as info:
        build_loss("nope")
    assert isinstance(info.value, ValueError)
    for name in ("dpo", "simpo", "orpo", "cpo", "ipo", "hinge"):
        assert name in str(info.value)
    assert build_loss(" DPO ").name == "dpo"


def test_unknown_field_lists_the_fields():
    with pytest.raises(LossConfigError) as info:
        build_loss("simpo", betta=2.0)
    assert info.value.field == "betta"
    message = str(info.value)
    assert "'betta'" in message and "beta" in message and "gamma" in message and "nll_scale" in message


@pytest.mark.parametrize(
    ("name", "fields", "field", "fragment"),
    [
        ("dpo", {"beta": 0.0}, "beta", "0 < beta"),
        ("dpo", {"beta": -1.0}, "beta", "-1.0"),
        ("ipo", {"beta": float("nan")}, "beta", "nan"),
        ("dpo", {"label_smoothing": 0.5}, "label_smoothing", "0 ≤ label_smoothing < 0.5"),
        ("dpo", {"label_smoothing": -0.1}, "label_smoothing", "-0.1"),
        ("dpo", {"length_normalization": "yes"}, "length_normalization", "true or false"),
        ("dpo", {"nll_scale": -1.0}, "nll_scale", "0 ≤ nll_scale"),
        ("simpo", {"gamma": float("inf")}, "gamma", "finite"),
        ("orpo", {"orpo_lambda": -0.1}, "orpo_lambda", "0 ≤ orpo_lambda"),
        ("cpo", {"beta": "5e-7"}, "beta", "write 5.0e-7"),
        ("hinge", {"beta": True}, "beta", "bool"),
    ],
)
def test_bad_config_values_name_field_value_and_rule(name, fields, field, fragment):
    with pytest.raises(LossConfigError) as info:
        build_loss(name, **fields)
    assert info.value.field == field
    assert field in str(info.value) and fragment in str(info.value)


def test_config_coerces_ints_and_negative_gamma_is_allowed():
    config = build_loss("simpo", beta=2, gamma=-1).config
    assert config.beta == 2.0 and isinstance(config.beta, float) and config.gamma == -1.0


@pytest.mark.parametrize("name", sorted(PROJECT_DEFAULTS))
def test_build_loss_takes_its_config_instance_and_refuses_another_loss_config(name):
    config_class = loss_class(name).config_class
    assert build_loss(name, config_class()).config == config_class()
    other = "simpo" if name != "simpo" else "dpo"
    with pytest.raises(LossConfigError, match=config_class.__qualname__):
        build_loss(name, loss_class(other).config_class())
    with pytest.raises(TypeError, match="not both"):
        build_loss(name, config_class(), beta=1.0)


NEW_LOSS_MODULE = '''
from dataclasses import dataclass

from steps.losses import LossOutput, PreferenceLoss, register_loss


@dataclass
class ShiftConfig:
    shift: float = 1.0


@register_loss("tmp-shift")
class ShiftLoss(PreferenceLoss):
    """ℓ = (S_l − S_w) + shift, needing a reference."""

    config_class = ShiftConfig
    requires_reference = True

    def compute(self, pairs):
        per_pair = pairs.rejected_logps - pairs.chosen_logps + self.config.shift
        return LossOutput(per_pair, pairs.chosen_logps, pairs.rejected_logps)
'''


def test_a_new_loss_is_one_file(tmp_path, monkeypatch):
    package = tmp_path / "tmp_extra_losses"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "shifted.py").write_text(textwrap.dedent(NEW_LOSS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_LOSSES", dict(registry._LOSSES))  # the registration ends with the test
    try:
        assert import_loss_modules("tmp_extra_losses") == ["tmp_extra_losses.shifted"]
        assert "tmp-shift" in registered_losses() and requires_reference("tmp-shift")
        out, _, _ = call(build_loss("tmp-shift", shift=2.0))
        # pair 0: −12 − (−10) + 2 = 0; pair 1: −15 − (−20) + 2 = 7
        assert out.per_pair.tolist() == [0.0, 7.0]
        assert out.metrics["reward_accuracy"] == 0.5
        with pytest.raises(MissingReferenceError):
            call(build_loss("tmp-shift"), r_w=None, r_l=None)
        importlib.reload(sys.modules["tmp_extra_losses.shifted"])  # re-importing the same module is not a clash
    finally:
        sys.modules.pop("tmp_extra_losses.shifted", None)
        sys.modules.pop("tmp_extra_losses", None)


def test_real_package_imports_all_its_loss_modules():
    modules = import_loss_modules("steps.losses")
    for name in ("dpo", "simpo", "orpo", "cpo", "ipo", "hinge"):
        assert f"steps.losses.{name}" in modules


def test_name_clash_and_bad_registrations_are_refused(monkeypatch):
    monkeypatch.setattr(registry, "_LOSSES", dict(registry._LOSSES))
    with pytest.raises(DuplicateLossError, match="already registered"):

        @register_loss("dpo")
        class OtherDPO(PreferenceLoss):
            config_class = loss_class("dpo").config_class

    with pytest.raises(TypeError, match="PreferenceLoss subclass"):

        @register_loss("tmp-function")
        def not_a_class(pairs, config):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="must be a dataclass"):

        @register_loss("tmp-no-config")
        class NoConfig(PreferenceLoss):
            pass

    with pytest.raises(ValueError, match="lower-case"):
        register_loss("Bad Name")
    assert "tmp-no-config" not in registered_losses() and "tmp-function" not in registered_losses()


# fairseq2's defaults as its docs state them (preference optimization tutorial; the recipe config classes)
FAIRSEQ2_DEFAULTS = {
    "dpo": {"beta": 0.1, "nll_scale": 0.0, "length_normalization": False},
    "simpo": {"beta": 1.0, "gamma": 0.5, "nll_scale": 0.0},
    "orpo": {"orpo_lambda": 1.0, "nll_scale": 1.0},
    "cpo": {"beta": 1.0, "nll_scale": 1.0},
}


@pytest.mark.parametrize("name", sorted(FAIRSEQ2_DEFAULTS))
def test_fairseq2_names_live_in_one_table_at_the_config_edge(name):
    from steps.config.fairseq2_losses import FAIRSEQ2_LOSSES

    names = FAIRSEQ2_LOSSES[name]
    config_class = loss_class(name).config_class
    assert not hasattr(config_class, "fairseq2")  # the loss's own module knows nothing of fairseq2
    assert dict(names.defaults) == FAIRSEQ2_DEFAULTS[name]
    fields = {f.name for f in dataclasses.fields(config_class)}
    assert set(names.defaults) <= fields and not (set(names.fields) & fields)
    config_class(**names.defaults)  # fairseq2's defaults are valid values here


def test_fairseq2_type_names_need_the_fairseq2_package():
    from steps.config.fairseq2_losses import FAIRSEQ2_LOSSES

    names = FAIRSEQ2_LOSSES["dpo"]
    assert names.names_type("fairseq2.recipes.lm.preference_finetune.dpo.DpoConfig")
    assert names.names_type("fairseq2.recipes.lm.DpoFinetuneConfig") and names.names_type("DpoConfig")
    assert not names.names_type("fairseq2x.DpoConfig") and not names.names_type("mypkg.DpoConfig")
    assert not names.names_type("fairseq2.recipes.lm.SimPOFinetuneConfig")
