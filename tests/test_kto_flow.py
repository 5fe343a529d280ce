"""``--loss kto`` in the flow: the plan accepts it with any pair format and refuses a pairwise loss on unpaired data
(fast), and real Metaflow runs (slow, tiny model) train KTO on OpenAssistant-2 trees and on a TRL unpaired file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from steps.config import ConfigError, config_from_dict, plan_variants

REPO = Path(__file__).resolve().parents[1]
SHARED_TREES = "oasst/oasst_en100_ready.trees.jsonl"  # the OpenAssistant-2 export's *.trees.jsonl format


# ---------------------------------------------------------------------------------------------- planning (fast)


def test_pairwise_loss_on_unpaired_data_is_refused_naming_the_field_and_the_fix():
    cfg = config_from_dict({"data": {"format": "unpaired", "input": "feedback.jsonl"}}, "run.yaml")
    for loss_arg in ("dpo", "kto,simpo", ""):  # "": the config's criterion (dpo)
        with pytest.raises(ConfigError) as err:
            plan_variants(cfg, loss_arg)
        assert err.value.source == "run.yaml" and err.value.key == "data.format", str(err.value)
        assert "--loss kto" in err.value.message and "oasst" in err.value.message, err.value.message
    with pytest.raises(ConfigError, match="simpo trains on preference pairs"):
        plan_variants(cfg, "kto,simpo")
    plan = plan_variants(cfg, "kto")  # the unpaired loss alone is fine (and SFT, on the desirable answers)
    assert [(v.name, v.loss) for v in plan.variants] == [("sft", "sft"), ("kto", "kto")]


def test_sft_only_on_unpaired_data_is_fine():
    cfg = config_from_dict({"data": {"format": "unpaired", "input": "feedback.jsonl"}}, "run.yaml")
    assert [v.name for v in plan_variants(cfg, "sft").variants] == ["sft"]


@pytest.mark.parametrize("fmt", ["oasst", "preference", "hh_rlhf", "ultrafeedback", "fairseq2"])
def test_kto_with_any_pair_format_and_beside_dpo(fmt):
    data = {"format": fmt} if fmt == "oasst" else {"format": fmt, "input": "pairs.jsonl"}
    cfg = config_from_dict({"data": data, "preference": {"per_loss": {"kto": {"criterion_config": {"beta": 0.2}}}}})
    plan = plan_variants(cfg, "dpo,kto")
    assert plan.losses == ["dpo", "kto"]
    resolved = {v.name: v.config.preference for v in plan.variants}
    assert resolved["kto"].criterion == "kto" and resolved["kto"].criterion_config.beta == 0.2
    assert resolved["kto"].criterion_config.desirable_weight == 1.0
    assert resolved["dpo"].criterion == "dpo"


def test_kto_sweep_file_plans_beside_dpo():
    cfg = config_from_dict({})
    plan = plan_variants(cfg, "dpo", str(REPO / "configs" / "sweeps" / "kto.yaml"))
    kto = [v for v in plan.variants if v.loss == "kto"]
    assert [v.name for v in plan.variants[:2]] == ["sft", "dpo"] and len(kto) == 4
    knobs = [v.config.preference.criterion_config for v in kto]
    assert sorted((k.beta, k.desirable_weight, k.undesirable_weight) for k in knobs) == [
        (0.1, 1.0, 1.0),
        (0.1, 1.33, 1.0),
        (0.3, 1.0, 1.0),
        (0.3, 1.33, 1.0),
    ]


# ---------------------------------------------------------------------------------------------- recipe (fast)


def test_recipe_reads_what_the_loss_trains_on_and_says_why_when_there_is_nothing(tmp_path, shared_dir, tokenizer):
    """A pair loss reads the pairs, KTO the kto files; OpenAssistant export trees have no quality labels, so the
    default rule labels nothing, and the error names the setting that fixes it."""
    from steps.config import DataConfig, PreferenceConfig
    from steps.data import prepare_data
    from steps.data.oasst_feedback import OasstFeedbackRule
    from steps.train.recipes import read_preference_data

    prepare_data(DataConfig(input=str(shared_dir / SHARED_TREES), max_trees=6), tmp_path / "quality")
    cfg = PreferenceConfig(max_seq_len=256, overlength="truncate")
    pairs = read_preference_data(tmp_path / "quality", "dpo", tokenizer, cfg)
    assert pairs.kind == "pairs" and len(pairs.train) == len(
        (tmp_path / "quality/preference.train.jsonl").read_text().splitlines()
    )
    with pytest.raises(ValueError, match=r"kto.train.jsonl: no training example for kto .*data.oasst_feedback.rule"):
        read_preference_data(tmp_path / "quality", "kto", tokenizer, cfg)
    emoji = DataConfig(
        input=str(shared_dir / SHARED_TREES), max_trees=6, oasst_feedback=OasstFeedbackRule(rule="emoji")
    )
    stats = prepare_data(emoji, tmp_path / "emoji").stats["kto"]
    examples = read_preference_data(tmp_path / "emoji", "kto", tokenizer, cfg)
    assert (
        examples.kind == "unpaired"
        and len(examples.train) + len(examples.dev) == stats["desirable"] + stats["undesirable"]
    )
    assert examples.stats["train"]["desirable"] == sum(e.desirable for e in examples.train) > 0


def test_reference_sums_are_cached_and_a_resumed_run_scores_nothing_again(tmp_path, tokenizer, tiny_model_factory):
    """before_training scores the missing sums through the policy (the run's cache written by rank 0); a second
    objective reads them all from the cache, and its before_training leaves them alone (a changed policy would have
    given other sums)."""
    import copy

    from steps.config import PreferenceConfig
    from steps.losses import build_loss
    from steps.train.precision import default_precision
    from steps.train.reference import CACHE_FILE, References, ReferenceSource
    from steps.train.unpaired import (
        UnpairedObjective,
        read_reference_cache,
        tokenize_unpaired,
        unpaired_cache_key,
    )
    from tests.test_kto_train import TOPICS_DEV, TOPICS_TRAIN, kto_rows

    train_ex, _ = tokenize_unpaired(kto_rows(TOPICS_TRAIN), tokenizer, 256)
    dev_ex, _ = tokenize_unpaired(kto_rows(TOPICS_DEV, both=False), tokenizer, 256)
    cfg, loss = PreferenceConfig(max_num_tokens=400, seed=3), build_loss("kto")
    source = ReferenceSource("the-init", tmp_path / CACHE_FILE)
    fresh = (copy.deepcopy(train_ex), copy.deepcopy(dev_ex))
    model = tiny_model_factory(seed=1)
    precision = default_precision(model)
    first = UnpairedObjective(train_ex, dev_ex, tokenizer.pad_token_id, cfg, loss, References(source=source))
    first.before_training(model, precision)
    sums = [(e.reference, e.reference_kl) for e in first.train + first.dev]
    assert all(r is not None and k is not None for r, k in sums)
    again = UnpairedObjective(*fresh, tokenizer.pad_token_id, cfg, loss, References(source=source))
    key = unpaired_cache_key("the-init", precision)
    assert read_reference_cache(tmp_path / CACHE_FILE, key, again.train + again.dev) == len(sums)
    again.before_training(tiny_model_factory(seed=2), precision)
    assert [(e.reference, e.reference_kl) for e in again.train + again.dev] == sums
    other = unpaired_cache_key("another-model", precision)
    assert read_reference_cache(tmp_path / CACHE_FILE, other, copy.deepcopy(train_ex)) == 0


# ---------------------------------------------------------------------------------------------- flow runs (slow)


def _kto_config(tmp_path: Path, data: dict, weights: tuple[float, float]) -> Path:
    """test_flow's tiny config (same model, SFT and light evaluation) with this data, KTO's weights, and a
    grad_accum above the number of micro-batches: step 1 is the whole training file, so its label counts are the
    file's (and each epoch is one step). No trackers, no (dry-run) upload."""
    from tests.test_flow import TINY_CONFIG

    cfg = yaml.safe_load(TINY_CONFIG)
    cfg["data"] = data
    cfg["preference"].update(grad_accum=1000, epochs=2)  # max_steps 2: two steps, one per epoch
    knobs = {"beta": 0.1, "desirable_weight": weights[0], "undesirable_weight": weights[1]}
    cfg["preference"]["per_loss"] = {"kto": {"criterion_config": knobs}}
    cfg["resources"]["output_dir"] = str(tmp_path / "runs")
    del cfg["tracking"], cfg["push_to_hub"]
    path = tmp_path / "kto.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kto_run(tmp_path: Path, data: dict, weights: tuple[float, float]):
    from metaflow import Runner, namespace

    from tests.test_flow import _env

    with Runner(
        str(REPO / "flows" / "pipeline.py"),
        show_output=False,
        env=_env(tmp_path),
        cwd=str(REPO),
        config=[("config", str(_kto_config(tmp_path, data, weights)))],
    ).run(loss="kto") as running:
        status, run, stdout, stderr = running.status, running.run, running.stdout, running.stderr
    assert status == "successful", stderr[-4000:]
    namespace(None)
    return run, stdout


def _labels(path: Path) -> tuple[int, int]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    desirable = sum(1 for r in rows if r["label"] is True)
    assert desirable + sum(1 for r in rows if r["label"] is False) == len(rows)
    return desirable, len(rows) - desirable


def _expected_first_loss(desirable: int, undesirable: int, w_d: float, w_u: float) -> float:
    """KTO at step 1, where the policy is its reference: every log-ratio is 0 and so is the KL estimate
    (max(0, mean 0)), so a desirable example costs w_d·(1 − σ(β·0)) and an undesirable one w_u·(1 − σ(β·0))."""
    half = 1.0 - 1.0 / (1.0 + math.exp(-0.0))
    return (w_d * half * desirable + w_u * half * undesirable) / (desirable + undesirable)


def _check_kto_run(run, stdout: str, weights: tuple[float, float]) -> tuple[dict, object]:
    """What both runs must show; returns the data stats and the kto row of the join."""
    data = run["prepare_data"].task.data
    data_dir = Path(data.data_dir)
    stats = json.loads((data_dir / "stats.json").read_text())
    train_d, train_u = _labels(data_dir / "kto.train.jsonl")
    dev_d, dev_u = _labels(data_dir / "kto.dev.jsonl")
    assert stats["kto"]["desirable"] == train_d + dev_d > 0 and stats["kto"]["undesirable"] == train_u + dev_u > 0
    assert stats["kto"]["split_sizes"] == {"train": train_d + train_u, "dev": dev_d + dev_u}
    summary = next(t.data.train_summary for t in run["preference"].tasks() if t.data.variant["name"] == "kto")
    assert summary.kind == "kto" and summary.steps == 2 and summary.reference == summary.init
    assert summary.data_stats["train"]["kept"] == train_d + train_u  # nothing dropped (overlength: truncate)
    assert summary.data_stats["train"]["desirable"] == train_d and summary.data_stats["dev"]["undesirable"] == dev_u
    first = summary.history[0]
    assert (first["count_desirable"], first["count_undesirable"]) == (train_d, train_u)  # step 1 = the whole file
    assert first["loss"] == pytest.approx(_expected_first_loss(train_d, train_u, *weights), abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert summary.history[1]["loss"] != pytest.approx(first["loss"], abs=1e-6)  # it trained
    logged = json.loads(Path(summary.metrics_path).read_text().splitlines()[0])
    assert logged["step"] == 1 and logged["loss"] == pytest.approx(first["loss"], rel=1e-9)
    assert summary.dev_history and summary.dev_history[-1]["dev_examples"] == dev_d + dev_u
    rows = {r.variant: r for r in run["join"].task.data.results}
    assert set(rows) == {"sft", "kto"}
    kto = rows["kto"]
    assert kto.evaluation.loss == "kto" and kto.evaluation.init == "SFT checkpoint"
    assert kto.evaluation.alpaca_eval is not None and kto.evaluation.alpaca_eval.scores.n_total == 3
    assert kto.training_config["criterion_config"]["desirable_weight"] == weights[0]
    w_d, w_u = (f"{w:g}" for w in weights)
    assert f"| KTO | lr=0.001, beta=0.1, desirable_weight={w_d}, undesirable_weight={w_u} |" in stdout
    return stats, kto


@pytest.mark.slow
def test_kto_flow_on_openassistant2_trees(tmp_path, shared_dir):
    """OpenAssistant-2 export trees (no quality labels: the emoji rule labels replies by users' votes); held-out
    preference metrics on the dev pairs, scored like every other variant's."""
    data = {
        "input": str(shared_dir / SHARED_TREES),
        "max_trees": 12,
        "dev_fraction": 0.25,
        "oasst_feedback": {"rule": "emoji"},
    }
    weights = (1.0, 1.5)
    run, stdout = _kto_run(tmp_path, data, weights)
    stats, kto = _check_kto_run(run, stdout, weights)
    assert stats["kto"]["rule"]["rule"] == "emoji" and stats["kto"]["skipped"]["no_votes"] > 0
    dev_pairs = Path(run["prepare_data"].task.data.data_dir, "preference.dev.jsonl").read_text().splitlines()
    heldout = kto.evaluation.heldout
    assert heldout is not None and heldout.n_pairs == len(dev_pairs) > 0
    assert heldout.beta == 0.1 and heldout.reward_accuracy is not None  # β·(policy − reference), KTO's own reward


PROMPTS = [
    ("Name a primary colour.", "Red is a primary colour.", "Purple, probably."),
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
    ("Translate 'cat' to French.", "'Cat' is 'chat' in French.", "'Cat' is 'perro' in French."),
    ("Which planet is closest to the Sun?", "Mercury.", "Jupiter is closest."),
    ("Is water wet?", "Water makes things wet; whether it is wet itself is a matter of definition.", "No."),
    ("Give a synonym of 'happy'.", "Joyful.", "Sad."),
    ("How many legs does a spider have?", "Eight.", "Six."),
    ("What is the capital of Italy?", "Rome.", "Milan is the capital of Italy."),
    ("Spell 'necessary'.", "n-e-c-e-s-s-a-r-y", "n-e-c-c-e-s-a-r-y"),
    ("What gas do plants take in?", "Carbon dioxide.", "Helium."),
    ("Boiling point of water at sea level in Celsius?", "100 °C.", "50 °C."),
    ("Who wrote 'Hamlet'?", "William Shakespeare.", "Charles Dickens."),
]


@pytest.mark.slow
def test_kto_flow_on_a_trl_unpaired_file(tmp_path):
    """data.format: unpaired (TRL's prompt/completion/label rows): no pairs, so held-out preference metrics are n/a;
    SFT trains on the desirable answers."""
    rows = []
    for i, (prompt, good, bad) in enumerate(PROMPTS):
        rows.append({"prompt": prompt, "completion": good, "label": True})
        rows.append({"prompt": prompt, "completion": bad, "label": False})
        if i % 3 == 0:  # unbalanced, as thumbs are
            rows.append({"prompt": prompt, "completion": bad + " Sorry.", "label": False})
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows))
    weights = (1.33, 1.0)
    data = {"format": "unpaired", "input": str(feedback), "dev_fraction": 0.25}
    run, stdout = _kto_run(tmp_path, data, weights)
    stats, kto = _check_kto_run(run, stdout, weights)
    assert stats["pairs"] == 0 and stats["kto"]["desirable"] == len(PROMPTS) == stats["sft_examples"]
    assert stats["kto"]["undesirable"] == len(rows) - len(PROMPTS)
    assert not Path(run["prepare_data"].task.data.data_dir, "preference.dev.jsonl").exists()
    assert kto.evaluation.heldout is None  # no dev pairs: the table says n/a
