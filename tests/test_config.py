"""Run configs: typed sections, one validation layer, per-variant plans, and errors that name the file and key."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.knob_hops import CONFIG as KNOB_HOPS_CONFIG
from steps.config import (
    ConfigError,
    EvaluationConfig,
    RunConfig,
    Variant,
    config_from_dict,
    config_to_dict,
    for_loss,
    load_config,
    load_plan,
    parse_config_text,
    parse_losses,
    parse_overrides,
    plan_for_start,
    plan_variants,
    preflight,
    read_sweep,
)
from steps.config.checked_plan import PLAN_VARIABLE
from steps.evaluate.settings import EngineSettings, GenerationSettings
from steps.losses.cpo import CPOConfig
from steps.losses.dpo import DPOConfig
from steps.losses.orpo import ORPOConfig
from steps.losses.simpo import SimPOConfig

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "flows" / "pipeline.py"


def write(tmp_path: Path, text: str | bytes, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


# ----------------------------------------------------------------------------- loading and checking


def test_default_and_recipe_configs_load():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.preference.criterion == "dpo"
    assert isinstance(cfg.preference.criterion_config, DPOConfig)
    assert sorted(p.name for p in (REPO / "configs" / "llama3_1_8b").iterdir()) == ["recipe.yaml"]  # one recipe
    load_config(RECIPE)


RECIPE = REPO / "configs" / "llama3_1_8b" / "recipe.yaml"
# Each branch of `--loss dpo,simpo,orpo,cpo` with the recipe, as documented (values read off the guide by hand):
# SFT and DPO from its results configs (sft_config.yaml, dpo_config.yaml: published rows), SimPO/ORPO/CPO from its
# example configs and hyperparameter advice. Common to all: 4 micro-batches per GPU x 8 GPUs, no clipping, cosine.
COMMON = {"grad_accum": 4, "max_grad_norm": None, "schedule": "cosine", "warmup_steps": 0, "parallelism": "fsdp"}
RESULTS = {**COMMON, "max_seq_len": 8192, "max_num_tokens": 8192, "schedule_cycle_steps": 1000, "max_steps": 1000}
EXAMPLE = {**COMMON, "max_seq_len": 1024, "max_num_tokens": 4096, "schedule_cycle_steps": 800, "max_steps": 800}
BRANCHES = {
    "sft": {**RESULTS, "lr": 5.5e-6, "final_lr": 1.1e-6, "epochs": 10, "seed": 1814, "init": "base"},
    "dpo": {
        **RESULTS,
        "lr": 1e-8,
        "final_lr": 5e-9,
        "epochs": 1,  # the published row is epoch 1 of the 1000-step cosine
        "seed": 666,
        "init": "sft",
        "reference": "sft",
        "criterion_config": DPOConfig(beta=0.5, nll_scale=1.0),
    },
    "simpo": {
        **EXAMPLE,
        "lr": 6e-7,
        "final_lr": 1.1e-6,  # the example's final_lr is above its lr: the lr rises, as fairseq2 ran it
        "epochs": 5,
        "seed": 1814,
        "init": "sft",
        "criterion_config": SimPOConfig(beta=2.0, gamma=1.0, nll_scale=0.0),
    },
    "orpo": {
        **EXAMPLE,
        "lr": 8e-6,
        "final_lr": 1.1e-6,
        "epochs": 5,
        "seed": 1814,
        "init": "base",
        "criterion_config": ORPOConfig(orpo_lambda=0.2, nll_scale=1.0),
    },
    "cpo": {
        **EXAMPLE,
        "lr": 1e-6,
        "final_lr": 5e-8,
        "epochs": 5,
        "seed": 1814,
        "init": "base",
        "criterion_config": CPOConfig(beta=0.1, nll_scale=0.0),  # nll_scale 0: the guide's advice
    },
}


@pytest.fixture(scope="module")
def recipe_branches():
    plan = plan_variants(load_config(RECIPE), "dpo,simpo,orpo,cpo")
    return {v.name: (v.config.sft if v.loss == "sft" else v.config.preference) for v in plan.variants}


@pytest.mark.parametrize(
    "branch,key", [(branch, key) for branch, settings in BRANCHES.items() for key in sorted(settings)]
)
def test_recipe_branch_settings(recipe_branches, branch, key):
    assert list(recipe_branches) == ["sft", "dpo", "simpo", "orpo", "cpo"]  # one SFT, four preference runs
    assert getattr(recipe_branches[branch], key) == BRANCHES[branch][key]


def test_recipe_model_and_evaluation():
    cfg = load_config(RECIPE)
    # fairseq2's bfloat16 is mixed precision over fp32 master weights (bf16 weights would round lr 1e-8 away)
    assert (cfg.model.base, cfg.model.dtype, cfg.model.master_dtype, cfg.model.gradient_checkpointing) == (
        "meta-llama/Llama-3.1-8B",
        "bfloat16",
        "float32",
        True,
    )
    # evaluation in fp32: DPO's lr 1e-8 update is below bf16's resolution (it would score the SFT model)
    assert (cfg.evaluation.dtype, cfg.resources.process_group_timeout_s) == ("float32", 3600)
    assert (cfg.evaluation.engine.gpu_memory_utilization, cfg.evaluation.engine.max_model_len) == (0.85, None)
    assert (cfg.resources.nproc_per_node, cfg.resources.train.gpu) == (8, 8)
    assert cfg.evaluation.judge == "alpaca_eval:weighted_alpaca_eval_gpt4_turbo" and cfg.data.input == (
        "OpenAssistant/oasst2"
    )


def test_recipe_sft_and_dpo_are_the_imported_results_configs(shared_dir, recipe_branches):
    """The recipe's published rows say what `from-fairseq2` makes of the guide's own files (DPO's epoch aside)."""
    from steps.config.fairseq2_import import convert_files

    imported = convert_files([shared_dir / "fairseq2/sft_config.yaml", shared_dir / "fairseq2/dpo_config.yaml"])
    cfg = config_from_dict(imported.config, "imported")
    dpo = for_loss(cfg, "dpo").preference
    for key in ("lr", "final_lr", "grad_accum", "max_grad_norm", "epochs", "max_steps", "schedule_cycle_steps"):
        assert getattr(cfg.sft, key) == getattr(recipe_branches["sft"], key), key
    for key in ("lr", "final_lr", "grad_accum", "max_grad_norm", "seed", "max_seq_len", "max_num_tokens", "init"):
        assert getattr(dpo, key) == getattr(recipe_branches["dpo"], key), key
    assert dpo.criterion_config == recipe_branches["dpo"].criterion_config
    assert (dpo.epochs, recipe_branches["dpo"].epochs) == (5, 1)  # the file's 5; the published checkpoint's 1
    recipe = load_config(RECIPE).model
    assert (cfg.model.dtype, cfg.model.master_dtype) == (recipe.dtype, recipe.master_dtype)


def test_final_lr_above_lr_is_accepted_with_a_note(tmp_path, caplog, monkeypatch):
    from steps.config import convert

    monkeypatch.setattr(convert, "_NOTED", set())
    with caplog.at_level("WARNING"):
        cfg = load_config(write(tmp_path, "preference:\n  lr: 6.0e-7\n  final_lr: 1.1e-6\n"))
    assert (cfg.preference.lr, cfg.preference.final_lr) == (6e-7, 1.1e-6)
    assert "preference.final_lr: 1.1e-06 is above lr 6e-07: the learning rate rises" in caplog.text


def test_fairseq2_shape_with_and_without_type(tmp_path):
    text = """
preference:
  criterion: simpo
  criterion_config:
    _type_: steps.losses.simpo.SimPOConfig
    beta: 2.0
    gamma: 1.0
    nll_scale: 0.0
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg.preference.criterion_config == SimPOConfig(beta=2.0, gamma=1.0, nll_scale=0.0)
    cfg2 = load_config(write(tmp_path, text.replace("    _type_: steps.losses.simpo.SimPOConfig\n", "")))
    assert cfg2.preference.criterion_config == cfg.preference.criterion_config


def test_type_mismatch_is_an_error(tmp_path):
    p = write(
        tmp_path, "preference:\n  criterion: simpo\n  criterion_config:\n    _type_: steps.losses.dpo.DPOConfig\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert err.value.key == "preference.criterion_config._type_"
    assert str(p) in str(err.value)


def test_misspelt_key_names_key_and_suggests(tmp_path):
    p = write(tmp_path, "sft:\n  learning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert err.value.key == "sft.learning_rate"
    assert str(p) in str(err.value) and "allowed keys" in str(err.value)
    p = write(tmp_path, "preference:\n  criterion_config:\n    betta: 0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert err.value.key == "preference.criterion_config.betta"
    assert "did you mean 'beta'" in str(err.value)


def test_unknown_criterion_lists_registered(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "preference:\n  criterion: simpoo\n"))
    assert err.value.key == "preference.criterion" and "did you mean 'simpo'" in str(err.value)
    for name in ("dpo", "simpo", "orpo", "cpo", "ipo", "hinge"):
        assert name in str(err.value)


def test_negative_beta_names_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "preference:\n  criterion_config:\n    beta: -1\n"))
    assert err.value.key == "preference.criterion_config.beta"
    assert "-1" in str(err.value)


@pytest.mark.parametrize(
    "text,key",
    [
        ("sft:\n  lr: 0\n", "sft.lr"),
        ("sft:\n  epochs: 0\n", "sft.epochs"),
        ("preference:\n  lr: -1.0e-6\n", "preference.lr"),
        ("sft:\n  epochs: two\n", "sft.epochs"),
        ("sft:\n  overlength: clip\n", "sft.overlength"),
        ("sft:\n  betas: [0.9, 1.5]\n", "sft.betas[1]"),
        ("sft:\n  lora: {r: many}\n", "sft.lora.r"),
        ("data:\n  pair_strategy: best_vs_all\n", "data.pair_strategy"),
        ("deployment:\n  schedule_cron: '0 3 * * *'\n", "deployment.schedule_cron"),
        ("deployment:\n  project: My-Team\n", "deployment.project"),
        ("preference:\n  per_loss:\n    orpoo: {lr: 1.0e-6}\n", "preference.per_loss.orpoo"),
        ("preference:\n  criterion_config: [1, 2]\n", "preference.criterion_config"),
        ("preference:\n  criterion_config: {beta: {deep: 1}}\n", "preference.criterion_config.beta"),
        ("sft:\n  parallelism: zero3\n", "sft.parallelism"),
        ("sft:\n  parallelism: fsdp\n  lora: {enabled: true}\n", "sft.parallelism"),
        ("evaluation:\n  temperature: -0.5\n", "evaluation.temperature"),
        ("evaluation:\n  top_p: 1.5\n", "evaluation.top_p"),
        ("evaluation:\n  batch_size: 0\n", "evaluation.batch_size"),
        ("evaluation:\n  max_new_tokens: 0\n", "evaluation.max_new_tokens"),
        ("evaluation:\n  max_instructions: 0\n", "evaluation.max_instructions"),
        ("evaluation:\n  gpu_memory_utilization: 0\n", "evaluation.gpu_memory_utilization"),
        ("evaluation:\n  gpu_memory_utilization: 1.2\n", "evaluation.gpu_memory_utilization"),
        ("evaluation:\n  max_model_len: 1\n", "evaluation.max_model_len"),
        ("evaluation:\n  generation_process: thread\n", "evaluation.generation_process"),
        ("evaluation:\n  generation_timeout_s: 0\n", "evaluation.generation_timeout_s"),
        ("resources:\n  train: {gpu: -1}\n", "resources.train.gpu"),
        ("sft:\n  final_lr: -1.0e-6\n", "sft.final_lr"),
        ("sft:\n  schedule_cycle_steps: 0\n", "sft.schedule_cycle_steps"),
        ("sft:\n  lr: 1.0e-5\n  final_lr: 1.0e+300\n", "sft.final_lr"),
        ("sft:\n  epochs: 1000000000000000000000000000000\n", "sft.epochs"),
        ("sft:\n  '': 1\n", "sft.''"),
        ("data:\n  format: trl\n", "data.format"),
        ("data:\n  format: preference\n", "data.input"),  # the embedded sample is OpenAssistant data
        ("data:\n  format: hh_rlhf\n  input: hh.jsonl\n  pair_strategy: best_vs_worst\n", "data.pair_strategy"),
        ("evaluation:\n  judge: openai_compatible\n  judge_model: m\n", "evaluation.judge_base_url"),
        (
            "evaluation:\n  judge: openai_compatible\n  judge_base_url: http://localhost:8000/v1\n",
            "evaluation.judge_model",
        ),
        ("evaluation:\n  judge_base_url: localhost:8000\n", "evaluation.judge_base_url"),
        ("evaluation:\n  judge_api_key_env: sk-abc123\n", "evaluation.judge_api_key_env"),
        ("evaluation:\n  judge_max_requests: 0\n", "evaluation.judge_max_requests"),
        ("evaluation:\n  paired_resamples: 10\n", "evaluation.paired_resamples"),
    ],
)
def test_out_of_range_and_wrong_types(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert err.value.key == key, str(err.value)
    assert str(err.value).startswith(f"{tmp_path / 'run.yaml'}: {key}: ")


@pytest.mark.parametrize(
    "text,key",
    [
        ("preference:\n  per_loss:\n    orpo: {lr: 0}\n", "preference.per_loss.orpo.lr"),
        (
            "preference:\n  per_loss:\n    orpo: {criterion_config: {orpo_lambda: -1}}\n",
            "preference.per_loss.orpo.criterion_config.orpo_lambda",
        ),
        ("preference:\n  per_loss:\n    orpo: {per_loss: {}}\n", "preference.per_loss.orpo.per_loss"),
    ],
)
def test_per_loss_entries_are_resolved_once_when_the_run_is_planned(tmp_path, text, key, monkeypatch):
    """Typing the config leaves per_loss as written (the loss names are checked); planning resolves every entry
    once, whether or not --loss runs it, and each variant trains the resolution made then."""
    from steps.config import plan as config_plan

    path = write(tmp_path, text)
    load_config(path)  # typed: per_loss not resolved yet
    with pytest.raises(ConfigError) as err:
        load_plan(yaml.safe_load(text), str(path), loss_arg="dpo")
    assert err.value.key == key and str(err.value).startswith(f"{path}: {key}: "), str(err.value)
    with pytest.raises(ConfigError) as err:
        load_plan(yaml.safe_load(text), str(path), set_arg="sft.epochs=2", loss_arg="dpo")
    assert err.value.source == str(path)  # an override elsewhere does not take the blame
    resolved = []
    real = config_plan.resolve_preference
    monkeypatch.setattr(config_plan, "resolve_preference", lambda *a, **k: resolved.append(a[1]) or real(*a, **k))
    plan = load_plan(yaml.safe_load(GOOD), "default.yaml", loss_arg="dpo,orpo,cpo,simpo")
    assert sorted(resolved) == ["cpo", "dpo", "orpo", "simpo"]  # each loss once: per_loss's and --loss's
    assert [v.config.preference.lr for v in plan.variants[1:]] == [5e-6, 8e-6, 5e-6, 5e-6]


def test_generation_settings_are_built_once_from_the_flat_keys(tmp_path):
    cfg = load_config(
        write(
            tmp_path, "evaluation:\n  max_new_tokens: 12\n  temperature: 0\n  top_p: 0.5\n  seed: 7\n  batch_size: 3\n"
        )
    )
    assert cfg.evaluation.generation == GenerationSettings(
        max_new_tokens=12, temperature=0.0, top_p=0.5, seed=7, batch_size=3
    )
    assert not cfg.evaluation.generation.do_sample
    assert "generation" not in config_to_dict(cfg)["evaluation"]  # YAML keeps its flat keys
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "evaluation:\n  generation: {seed: 1}\n"))
    assert err.value.key == "evaluation.generation"
    assert EvaluationConfig().generation == GenerationSettings()  # the same defaults in both places


def test_engine_settings_are_built_once_from_the_flat_keys(tmp_path):
    text = "evaluation:\n  gpu_memory_utilization: 1\n  max_model_len: 4096\n  generation_process: subprocess\n"
    cfg = load_config(write(tmp_path, text + "  generation_timeout_s: 60\n"))
    assert cfg.evaluation.engine == EngineSettings(
        gpu_memory_utilization=1.0, max_model_len=4096, process="subprocess", timeout_s=60.0
    )
    assert "engine" not in config_to_dict(cfg)["evaluation"]
    assert EvaluationConfig().engine == EngineSettings()  # the same defaults in both places
    assert EngineSettings().gpu_memory_utilization == 0.85 and EvaluationConfig().weight_change_check


def test_yaml11_exponent_string_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "preference:\n  lr: 5e-7\n  final_lr: 1e-7\n"))
    assert cfg.preference.lr == 5e-7 and isinstance(cfg.preference.lr, float)


def test_overrides_from_the_command_line():
    ov = parse_overrides("preference.criterion_config.beta=0.5 sft.epochs=2 data.langs=[en,de]")
    assert ov == {"preference.criterion_config.beta": 0.5, "sft.epochs": 2, "data.langs": ["en", "de"]}
    cfg = load_config(REPO / "configs/default.yaml", ov)
    assert cfg.preference.criterion_config.beta == 0.5 and cfg.sft.epochs == 2 and cfg.data.langs == ["en", "de"]


@pytest.mark.parametrize(
    "text,key",
    [
        ("sft.epocs=2", "sft.epocs"),
        ("sft.lr=abc", "sft.lr"),
        ("preference.criterion_config.beta=-2", "preference.criterion_config.beta"),
        ("sft.lr.x=1", "sft.lr"),
        ("sft", "sft"),
    ],
)
def test_bad_override_is_blamed_on_set(text, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/default.yaml", parse_overrides(text))
    assert (err.value.source, err.value.key) == ("--set", key), str(err.value)


def test_losses_argument_and_per_loss_resolution():
    cfg = load_config(REPO / "configs/default.yaml")
    assert parse_losses("dpo,simpo,orpo", cfg) == ["dpo", "simpo", "orpo"]
    assert parse_losses("sft", cfg) == []
    assert parse_losses("", cfg) == ["dpo"]
    with pytest.raises(ConfigError) as err:
        parse_losses("dpo,dpp", cfg)
    assert err.value.source == "--loss" and "did you mean 'dpo'" in str(err.value) and "simpo" in str(err.value)
    orpo = for_loss(cfg, "orpo").preference
    assert (orpo.lr, orpo.final_lr, orpo.criterion, orpo.per_loss) == (8e-6, 8e-7, "orpo", {})
    assert orpo.criterion_config == ORPOConfig()  # the dpo section's beta does not leak into another loss
    dpo = for_loss(cfg, "dpo").preference
    assert dpo.criterion_config is cfg.preference.criterion_config  # nothing to merge: the same object


def test_plan_has_one_resolved_config_per_variant():
    plan = load_plan(
        yaml.safe_load((REPO / "configs/default.yaml").read_text()),
        "default.yaml",
        loss_arg="dpo,orpo",
        set_arg="preference.per_loss.orpo.criterion_config.orpo_lambda=0.3",
    )
    assert [(v.variant, v.config.preference.criterion) for v in plan.variants] == [
        (Variant("sft", "sft"), "dpo"),
        (Variant("dpo", "dpo"), "dpo"),
        (Variant("orpo", "orpo"), "orpo"),
    ]
    assert plan.variants[2].config.preference.criterion_config == ORPOConfig(orpo_lambda=0.3)
    assert plan.variants[2].config.preference.lr == 8e-6
    assert plan.variants[2].config.sft == plan.config.sft  # only the preference section differs
    assert pickle.loads(pickle.dumps(plan)) == plan  # Metaflow artifacts are pickles
    with pytest.raises(ConfigError, match="nothing to train"):
        plan_variants(config_from_dict({"sft": {"enabled": False}}), "sft")
    with pytest.raises(ConfigError, match=r"preference\.init: is 'sft' but sft\.enabled is false"):
        plan_variants(config_from_dict({"sft": {"enabled": False}, "preference": {"init": "sft"}}), "dpo")


def test_simpo_sweep_file_expands_to_the_paper_grid(tmp_path):
    cfg = load_config(REPO / "configs/default.yaml")
    assert len(read_sweep(REPO / "configs/sweeps/simpo.yaml").points) == 12
    plan = plan_variants(cfg, "dpo", str(REPO / "configs/sweeps/simpo.yaml"))
    points = [v for v in plan.variants if v.loss == "simpo"]
    assert [v.name for v in plan.variants[:2]] == ["sft", "dpo"] and len(points) == 12
    assert len({p.name for p in points}) == 12 and "simpo-beta2.5-gamma1.4" in {p.name for p in points}
    grid = {(p.config.preference.criterion_config.beta, p.config.preference.criterion_config.gamma) for p in points}
    assert grid == {(b, g) for b in (2.0, 2.5) for g in (0.3, 0.5, 1.0, 1.2, 1.4, 1.6)}
    bad = write(tmp_path, "loss: simpo\ngrid:\n  criterion_config.beta: [2.0, -1.0]\n", "bad.yaml")
    with pytest.raises(ConfigError) as err:
        plan_variants(cfg, "", str(bad))
    assert err.value.source == str(bad)
    assert "simpo-beta-1" in str(err.value) and "criterion_config.beta" in str(err.value)
    typo = write(tmp_path, "loss: simpo\ngrid:\n  criterion_config.gama: [1.0]\n", "typo.yaml")
    with pytest.raises(ConfigError, match="did you mean 'gamma'"):
        plan_variants(cfg, "", str(typo))


def test_launch_config_crosses_the_torchrun_boundary_as_the_planned_objects(tmp_path, monkeypatch):
    """Ranks read the typed, checked config as it was planned: no typing, no check, no per_loss resolution."""
    from steps.config import convert
    from steps.train.launch import read_launch_config, write_launch_config

    cfg = for_loss(load_config(REPO / "configs/default.yaml"), "orpo")
    path = write_launch_config(cfg, tmp_path / "launch_config.pkl")
    typed = []
    monkeypatch.setattr(convert, "build", lambda *a, **k: typed.append(a[0]))
    monkeypatch.setattr(convert, "checked", lambda *a, **k: typed.append(a[0]))
    back = read_launch_config(path)
    assert back == cfg and back.source == cfg.source and not typed
    assert back.preference.criterion_config == ORPOConfig() and back.preference.lr == 8e-6
    with pytest.raises(TypeError, match="not the RunConfig"):
        read_launch_config(write_launch_config(cfg.preference, tmp_path / "other.pkl"))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- YAML to the loss

#: The run the knob-hop benchmark traces (benchmarks/knob_hops.py): tiny model, beta 0.37, one DPO step.
HOP_CONFIG = KNOB_HOPS_CONFIG


def test_beta_travels_from_yaml_to_the_loss_in_at_most_four_hops(tmp_path, monkeypatch):
    """The real path of the flow (Config parser -> start -> preference step), counting every conversion of beta."""
    from steps import losses
    from steps.pipeline import plan_run, prepare_data, step_context, train_variant

    hops: list[str] = []
    stage = ["Metaflow Config parser"]
    real_post_init = DPOConfig.__post_init__

    def counting_post_init(self):  # every DPOConfig construction (from a mapping or a replace) passes here
        hops.append(f"mapping -> DPOConfig ({stage[0]})")
        real_post_init(self)

    monkeypatch.setattr(DPOConfig, "__post_init__", counting_post_init)
    reached = []
    real_build_loss = losses.build_loss
    monkeypatch.setattr(
        losses,
        "build_loss",
        lambda name, config=None, **kw: reached.append(config) or real_build_loss(name, config, **kw),
    )

    text = HOP_CONFIG.replace("OUTPUT_DIR", str(tmp_path / "runs"))
    hops.append("YAML text -> mapping")
    config_value = parse_config_text(text)
    assert config_value == yaml.safe_load(text)  # the parser only loads: the mapping as written
    config_value = json.loads(json.dumps(config_value))  # Metaflow keeps Config values as JSON
    stage[0] = "start"
    plan, output_root = plan_run(config_value, "dpo", "", "", "PrefFlow", "1")
    (dpo,) = [v for v in plan.variants if v.loss == "dpo"]
    dpo = pickle.loads(pickle.dumps(dpo))  # artifact from start to the preference step
    data_dir, _ = prepare_data(step_context(plan.config, output_root))
    stage[0] = "preference step"
    summary = train_variant(step_context(dpo.config, output_root), dpo, data_dir, None)

    assert len(reached) == 1 and reached[0] == dpo.config.preference.criterion_config
    assert reached[0].beta == 0.37  # the YAML's value reached the loss
    assert summary is not None and summary.steps == 1 and summary.config.criterion_config.beta == 0.37
    assert not [h for h in hops if "preference step" in h], hops  # the step trains the planned object as is
    assert len(hops) <= 4, hops
    assert hops == ["YAML text -> mapping", "mapping -> DPOConfig (start)"]  # start without the preflight's plan


# ----------------------------------------------------------------------------- the command-line preflight


def _flow_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("USERNAME", "USER", "METAFLOW_USER", "SUDO_USER")}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "USERNAME": "prefflow-test",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"),
        **extra,
    }


def _run_flow(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PIPELINE), *args],
        cwd=tmp_path,
        env=_flow_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


GOOD = (REPO / "configs" / "default.yaml").read_text()

PREFLIGHT_CASES = {
    "yaml list": ("- data\n- model\n", [], ["expected a mapping of sections", "got list"]),
    "yaml scalar": ("42\n", [], ["expected a mapping of sections", "got int"]),
    "deep criterion_config": (
        GOOD.replace("beta: 0.1", "beta: [0.1, 0.2]"),
        [],
        ["preference.criterion_config.beta", "expected a number"],
    ),
    "criterion_config not a mapping": (
        GOOD.replace("    beta: 0.1\n    nll_scale: 0.0\n", "    - 0.1\n"),
        [],
        ["preference.criterion_config", "expected a mapping of DPOConfig fields"],
    ),
    "set not a number": (GOOD, ["--set", "sft.lr=abc"], ["--set: sft.lr: got 'abc'; expected a number"]),
    "unknown loss": (GOOD, ["--loss", "dpo,bco"], ["--loss: bco: unknown loss", "simpo"]),
    "non-UTF-8": (
        GOOD.encode() + "# caf\u00e9\n".encode("latin-1"),
        [],
        [f"not UTF-8 text (byte 0xe9 on line {GOOD.count(chr(10)) + 1})"],
    ),
    "missing file": (None, [], ["file not found"]),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT_CASES))
def test_preflight_prints_one_line_and_exits_2(tmp_path, case):
    text, extra, expected = PREFLIGHT_CASES[case]
    path = tmp_path / "run.yaml"
    if text is not None:
        write(tmp_path, text)
    proc = _run_flow(tmp_path, "--config", "config", str(path), "run", *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    source = "--set" if "--set" in extra else "--loss" if "--loss" in extra else str(path)
    assert lines[0].startswith(f"error: {source}: "), lines[0]
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (tmp_path / "mf").exists() and not (tmp_path / "runs").exists()  # no run, no step


def test_config_without_its_name_gets_the_hint(tmp_path):
    path = write(tmp_path, GOOD)
    proc = _run_flow(tmp_path, "--config", str(path), "run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "use --config config FILE" in proc.stderr and str(path) in proc.stderr
    assert not (tmp_path / "mf").exists()


def test_default_config_and_parameters_are_checked_too(tmp_path):
    proc = _run_flow(tmp_path, "run", "--sweep", str(tmp_path / "nope.yaml"))
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == f"error: {tmp_path / 'nope.yaml'}: file not found; pass an existing YAML file (see configs/)"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "config", "MISSING", "step", "start", "--run-id", "1", "--task-id", "1"],
        ["--config", "config", "MISSING", "--help"],
        ["--config", "config", "MISSING", "logs", "PrefFlow/1/start"],
    ],
)
def test_preflight_skips_task_subprocesses_and_help(tmp_path, argv):
    assert preflight([a.replace("MISSING", str(tmp_path / "missing.yaml")) for a in argv]) == 0


@pytest.mark.parametrize(
    "argv,code",
    [
        (["run"], 0),
        (["--no-pylint", "--with", "retry", "run", "--loss=simpo"], 0),
        (["show"], 0),
        (["--datastore", "local", "argo-workflows", "create", "--only-json"], 0),
        (["run", "--loss=nope"], 2),
        (["resume", "--set", "sft.epochs=0"], 2),
        (["--branch", "x", "run", "--loss", "x"], 2),
    ],
)
def test_preflight_reads_metaflow_command_lines(argv, code, capsys):
    assert preflight(argv) == code
    assert len(capsys.readouterr().err.splitlines()) == (1 if code else 0)


def test_show_works_without_a_user_name(tmp_path):
    env = {k: v for k, v in _flow_env(tmp_path).items() if k != "USERNAME"}
    proc = subprocess.run(
        [sys.executable, str(PIPELINE), "show"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Step start" in proc.stdout + proc.stderr and "Unknown user" not in proc.stderr


def test_metaflow_parser_only_loads_and_start_checks_once_naming_the_config(monkeypatch):
    """The parser hands on the mapping as written (a YAML error still fails there); without the preflight's plan
    (Argo, a pod, ``step``) start's one check names the config, not argv."""
    monkeypatch.setattr(sys, "argv", ["pytest", "--config", "config", "somewhere-else.yaml"])
    monkeypatch.delenv(PLAN_VARIABLE, raising=False)
    assert parse_config_text("sft:\n  lr: 0\n") == {"sft": {"lr": 0}}
    with pytest.raises(ConfigError) as err:
        parse_config_text("sft: [lr: 0\n")
    assert err.value.source == "config" and "not valid YAML" in str(err.value)
    with pytest.raises(ConfigError) as err:
        plan_for_start({"sft": {"lr": 0}}, "config")
    assert (err.value.source, err.value.key) == ("config", "sft.lr")


def test_start_takes_the_preflights_plan_for_the_same_inputs_and_types_it_otherwise(tmp_path, monkeypatch, caplog):
    """A normal command-line run types its config once: the preflight's plan reaches start through the environment
    (what Metaflow's local runtime passes its tasks); other inputs, or no preflight, are typed in start, once."""
    from steps.config import loading

    typed: list[str] = []
    real_build = loading.build
    monkeypatch.setattr(loading, "build", lambda cls, *a, **k: typed.append(cls.__name__) or real_build(cls, *a, **k))
    path = write(tmp_path, GOOD)
    assert preflight(["--config", "config", str(path), "run", "--loss", "dpo,orpo"]) == 0
    assert typed == ["RunConfig"] and os.environ[PLAN_VARIABLE]
    data = json.loads(json.dumps(yaml.safe_load(GOOD)))  # the Config value Metaflow hands start
    with caplog.at_level("INFO"):
        plan = plan_for_start(data, "config", "", "dpo,orpo", "")
    assert typed == ["RunConfig"] and "not typed again" in caplog.text  # the preflight's plan, as it checked it
    assert [v.name for v in plan.variants] == ["sft", "dpo", "orpo"] and plan.config.source == str(path)
    assert plan == load_plan(data, "config", "", "dpo,orpo")  # what start would have made
    typed.clear()
    plan_for_start(data, "config", "", "dpo", "")  # another --loss
    plan_for_start({**data, "sft": {**data["sft"], "epochs": 2}}, "config", "", "dpo,orpo", "")  # another config
    assert typed == ["RunConfig", "RunConfig"]
    monkeypatch.setenv(PLAN_VARIABLE, "not a plan")
    assert plan_for_start(data, "config", "", "dpo,orpo", "") == plan  # a damaged value: start plans
    monkeypatch.delenv(PLAN_VARIABLE)
    assert preflight(["--config", "config", str(path), "show"]) == 0 and PLAN_VARIABLE not in os.environ


def test_typed_config_is_a_dataclass_tree():
    cfg = load_config()
    assert isinstance(cfg, RunConfig) and cfg.source.endswith("configs/default.yaml")
    with pytest.raises(AttributeError):
        cfg.sft.lr = 1.0  # frozen: nothing changes a checked config behind the checks' back


def test_reference_from_sft_needs_sft():
    with pytest.raises(ConfigError, match=r"preference\.reference: is 'sft' for dpo but sft\.enabled is false"):
        plan_variants(config_from_dict({"sft": {"enabled": False}, "preference": {"reference": "sft"}}), "dpo")


def test_preflight_holds_notes_back_when_the_command_line_fails(tmp_path, capsys, caplog, monkeypatch):
    """A config that logs a note and then fails prints only the error line; a good one logs its notes."""
    from steps.config import convert

    monkeypatch.setattr(convert, "_NOTED", set())
    rising = write(tmp_path, GOOD.replace("final_lr: 5.0e-7", "final_lr: 5.0e-5"), "rising.yaml")
    with caplog.at_level("WARNING"):
        assert preflight(["--config", "config", str(rising), "run", "--loss", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --loss: nope: unknown loss"), err
    assert not caplog.records
    monkeypatch.setattr(convert, "_NOTED", set())
    with caplog.at_level("WARNING"):
        assert preflight(["--config", "config", str(rising), "run"]) == 0
    assert "preference.final_lr: 5e-05 is above lr 5e-06" in caplog.text
