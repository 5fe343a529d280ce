"""Config loading: typed sections, fairseq2-shaped criterion config, clear errors before any work."""
from pathlib import Path

import pytest

from steps.config import (ConfigError, load_config, parse_losses, parse_overrides, resolve_preference)
from steps.losses.dpo import DPOConfig
from steps.losses.simpo import SimPOConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_default_and_recipe_configs_load():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.preference.criterion == "dpo"
    assert isinstance(cfg.preference.criterion_config, DPOConfig)
    for name in ("sft", "dpo", "simpo", "orpo", "cpo"):
        load_config(REPO / "configs" / "llama3_1_8b" / f"{name}.yaml")


def test_documented_recipe_values():
    sft = load_config(REPO / "configs/llama3_1_8b/sft.yaml").sft
    assert (sft.lr, sft.final_lr, sft.betas, sft.weight_decay, sft.max_grad_norm) == (5.5e-6, 1.1e-6, (0.9, 0.95), 0.1, 1.0)
    assert (sft.max_num_tokens, sft.grad_accum, sft.epochs, sft.seed) == (8192, 4, 10, 1814)
    dpo = load_config(REPO / "configs/llama3_1_8b/dpo.yaml").preference
    assert (dpo.criterion_config.beta, dpo.criterion_config.nll_scale, dpo.lr, dpo.final_lr, dpo.init) == \
        (0.5, 1.0, 1e-8, 5e-9, "sft")
    simpo = load_config(REPO / "configs/llama3_1_8b/simpo.yaml").preference
    assert isinstance(simpo.criterion_config, SimPOConfig)
    assert (simpo.criterion_config.beta, simpo.criterion_config.gamma, simpo.lr) == (2.0, 1.0, 6e-7)
    orpo = load_config(REPO / "configs/llama3_1_8b/orpo.yaml").preference
    assert (orpo.criterion_config.orpo_lambda, orpo.lr, orpo.init) == (0.2, 8e-6, "base")
    cpo = load_config(REPO / "configs/llama3_1_8b/cpo.yaml").preference
    assert (cpo.criterion_config.beta, cpo.criterion_config.nll_scale, cpo.lr, cpo.init) == (0.1, 0.0, 1e-6, "base")
    # 8B full fine-tuning does not fit replicated on 80 GB GPUs: every recipe shards
    assert sft.parallelism == "fsdp" and {dpo.parallelism, simpo.parallelism, orpo.parallelism, cpo.parallelism} == {"fsdp"}


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
    p = write(tmp_path, "preference:\n  criterion: simpo\n  criterion_config:\n    _type_: steps.losses.dpo.DPOConfig\n")
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
    assert "beta" in str(err.value)


def test_unknown_criterion_lists_registered(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "preference:\n  criterion: kto2\n"))
    assert err.value.key == "preference.criterion"
    for name in ("dpo", "simpo", "orpo", "cpo", "ipo", "hinge"):
        assert name in str(err.value)


def test_negative_beta_names_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "preference:\n  criterion_config:\n    beta: -1\n"))
    assert err.value.key == "preference.criterion_config.beta"
    assert "-1" in str(err.value)


@pytest.mark.parametrize("text,key", [
    ("sft:\n  lr: 0\n", "sft.lr"),
    ("sft:\n  epochs: 0\n", "sft.epochs"),
    ("preference:\n  lr: -1.0e-6\n", "preference.lr"),
    ("sft:\n  epochs: two\n", "sft.epochs"),
    ("sft:\n  overlength: clip\n", "sft.overlength"),
    ("data:\n  pair_strategy: best_vs_all\n", "data.pair_strategy"),
    ("deployment:\n  schedule_cron: '0 3 * * *'\n", "deployment.schedule_cron"),
    ("preference:\n  per_loss:\n    orpo: {lr: 0}\n", "preference.per_loss.orpo.lr"),
    ("sft:\n  parallelism: zero3\n", "sft.parallelism"),
    ("sft:\n  parallelism: fsdp\n  lora: {enabled: true}\n", "sft.parallelism"),
])
def test_out_of_range_and_wrong_types(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert err.value.key == key, str(err.value)


def test_yaml11_exponent_string_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "preference:\n  lr: 5e-7\n  final_lr: 1e-7\n"))
    assert cfg.preference.lr == 5e-7 and isinstance(cfg.preference.lr, float)


def test_overrides_from_the_command_line():
    ov = parse_overrides("preference.criterion_config.beta=0.5 sft.epochs=2 data.langs=[en,de]")
    assert ov == {"preference.criterion_config.beta": 0.5, "sft.epochs": 2, "data.langs": ["en", "de"]}
    cfg = load_config(REPO / "configs/default.yaml", ov)
    assert cfg.preference.criterion_config.beta == 0.5 and cfg.sft.epochs == 2 and cfg.data.langs == ["en", "de"]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/default.yaml", parse_overrides("sft.epocs=2"))
    assert err.value.key == "sft.epocs"


def test_losses_argument_and_per_loss_resolution():
    cfg = load_config(REPO / "configs/default.yaml")
    assert parse_losses("dpo,simpo,orpo", cfg) == ["dpo", "simpo", "orpo"]
    assert parse_losses("sft", cfg) == []
    assert parse_losses("", cfg) == ["dpo"]
    with pytest.raises(ConfigError) as err:
        parse_losses("dpo,nope", cfg)
    assert "simpo" in str(err.value)
    orpo = resolve_preference(cfg, "orpo")
    assert orpo.lr == 8e-6 and orpo.criterion == "orpo"
    assert type(orpo.criterion_config).__name__ == "ORPOConfig"
    dpo = resolve_preference(cfg, "dpo")
    assert dpo.criterion_config.beta == cfg.preference.criterion_config.beta


def test_simpo_sweep_file_expands_to_the_paper_grid(tmp_path):
    from steps.config import config_from_dict, config_to_dict, load_sweep

    cfg = load_config(REPO / "configs/default.yaml")
    points = load_sweep(REPO / "configs/sweeps/simpo.yaml", cfg)
    assert len(points) == 12 and {p["loss"] for p in points} == {"simpo"}
    assert len({p["name"] for p in points}) == 12
    assert "simpo-beta2.5-gamma1.4" in {p["name"] for p in points}
    grid = set()
    for p in points:
        point_cfg = config_from_dict(config_to_dict(cfg), "x", p["overrides"])
        cc = resolve_preference(point_cfg, "simpo").criterion_config
        grid.add((cc.beta, cc.gamma))
    assert grid == {(b, g) for b in (2.0, 2.5) for g in (0.3, 0.5, 1.0, 1.2, 1.4, 1.6)}
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: simpo\ngrid:\n  criterion_config.beta: [2.0, -1.0]\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(bad, cfg)
    assert "simpo-beta-1" in str(err.value) and "beta" in str(err.value)
