"""``python -m steps.config from-fairseq2``: the guide's published SFT and DPO recipe files convert to a PrefFlow
config with the guide's settings; the 2025 sectioned form converts alike; every key is mapped or listed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steps.config import ConfigError, load_config, plan_variants
from steps.config.fairseq2_import import convert_files, convert_recipes
from steps.config.fairseq2_names import MODEL_IDS, model_spec
from steps.config.fairseq2_recipes import read_recipe
from steps.losses.dpo import DPOConfig
from steps.losses.simpo import SimPOConfig
from steps.train.schedule import lr_lambda

REPO = Path(__file__).resolve().parents[1]
GPUS = 8  # the guide's runs: one node of 8 GPUs


@pytest.fixture(scope="module")
def guide(shared_dir, tmp_path_factory):
    """The converted results configs, written and read back as a PrefFlow config file."""
    conversion = convert_files([shared_dir / "fairseq2/sft_config.yaml", shared_dir / "fairseq2/dpo_config.yaml"])
    out = tmp_path_factory.mktemp("import") / "recipe.yaml"
    out.write_text(conversion.yaml())
    cfg = load_config(out)
    plan = {v.name: v.config for v in plan_variants(cfg, "dpo").variants}
    return conversion, cfg, plan


# The guide's published settings (sft_config.yaml, dpo_config.yaml), each read off the files by hand.
SFT_EXPECTED = {
    "lr": 5.5e-06,
    "final_lr": 1.1e-06,
    "grad_accum": 4,  # gradient_accumulation 4 on each GPU: per rank in both
    "max_grad_norm": None,  # max_gradient_norm: null -> no clipping
    "epochs": 10,
    "max_steps": 1000,
    "schedule_cycle_steps": 1000,  # cycle_len null: max_num_steps - 0 warmup
    "seed": 1814,
    "max_seq_len": 8192,
    "max_num_tokens": 8192,
    "warmup_steps": 0,
    "betas": (0.9, 0.95),
    "weight_decay": 0.1,
    "parallelism": "fsdp",
    "init": "base",
}
DPO_EXPECTED = {
    **{k: v for k, v in SFT_EXPECTED.items() if k != "init"},
    "lr": 1.0e-08,
    "final_lr": 5.0e-09,
    "epochs": 5,
    "seed": 666,
    "init": "sft",  # model: checkpoint_step_240
    "reference": "sft",  # reference_model: checkpoint_step_240
}


@pytest.mark.parametrize("name", sorted(SFT_EXPECTED))
def test_converted_sft_settings_are_the_guides(guide, name):
    _, _, plan = guide
    assert getattr(plan["sft"].sft, name) == SFT_EXPECTED[name]


@pytest.mark.parametrize("name", sorted(DPO_EXPECTED))
def test_converted_dpo_settings_are_the_guides(guide, name):
    _, _, plan = guide
    assert getattr(plan["dpo"].preference, name) == DPO_EXPECTED[name]


def test_converted_model_loss_and_dtype(guide):
    _, cfg, plan = guide
    assert plan["dpo"].preference.criterion_config == DPOConfig(beta=0.5, nll_scale=1.0)
    assert cfg.model.base == "meta-llama/Llama-3.1-8B"  # model: llama3_1_8b
    # dtype bfloat16 under fairseq2's mixed precision = fp32 master weights, bf16 compute (autocast on GPU)
    assert (cfg.model.dtype, cfg.model.master_dtype) == ("bfloat16", "float32") and cfg.model.gradient_checkpointing
    assert cfg.resources.nproc_per_node == GPUS and cfg.resources.train.gpu == GPUS
    assert cfg.data.input == "OpenAssistant/oasst2"


def test_cosine_cycle_keeps_fairseq2s_meaning(guide):
    """SFT ends after 10 epochs (checkpoint_step_240) on a 1000-step cosine: its last lr is ~4.9e-6, not 1.1e-6."""
    _, _, plan = guide
    sft = plan["sft"].sft
    f = lr_lambda(sft, total_steps=240)
    expected = 1.1e-6 + 0.5 * (5.5e-6 - 1.1e-6) * (1 + math.cos(math.pi * 239 / 1000))  # fairseq2's formula
    assert sft.lr * f(239) == pytest.approx(expected, rel=1e-12)
    assert sft.lr * f(239) == pytest.approx(4.9085e-6, rel=1e-4)  # 1.1e-6 + 2.2e-6 * (1 + 0.731116)


def test_every_key_is_mapped_or_listed(guide, shared_dir):
    conversion, _, _ = guide
    for name in ("sft_config.yaml", "dpo_config.yaml"):
        source = str(shared_dir / "fairseq2" / name)
        data = yaml.safe_load(Path(source).read_text())
        recipe = read_recipe(source, data)
        noted = {n.key for n in conversion.notes if n.source == source}
        accounted = noted | set(conversion.mapped[source])
        assert set(recipe.spelling.values()) <= accounted, set(recipe.spelling.values()) - accounted
        assert not [n for n in conversion.notes if n.source == source and n.kind == "unknown"]
    kinds = {n.kind for n in conversion.notes}
    assert kinds <= {"mapped", "changed", "not applicable", "unknown"}
    why = {n.key: n.message for n in conversion.notes if n.kind == "not applicable"}
    assert "shuffles" in why["example_shuffle_window"] and "tensor parallelism" in why["tensor_parallel_size"]
    assert "no effect here" in why["criterion_config.reference_dtype"]
    changed = {n.key: n.message for n in conversion.notes if n.kind == "changed" and "dpo" in n.source}
    assert "max_num_steps - num_warmup_steps = 1000" in changed["lr_scheduler_config.cycle_len"]


SECTIONED_SIMPO = """
model: {_set_: {name: llama3_8b}}
dataset:
  _set_: {name: gsm8k_dpo, max_seq_len: 1024, max_num_tokens: 4096, batch_size: null, mask_source_tokens: true,
          example_shuffle_window: 2000}
criterion:
  _set_: {name: simpo}
  config: {_set_: {beta: 2, gamma: 1, nll_scale: 0}}
gang: {_set_: {tensor_parallel_size: 1}}
trainer:
  _set_: {dtype: bfloat16, data_parallelism: fsdp, mixed_precision: static, gradient_accumulation: 4,
          activation_checkpointing: true, max_gradient_norm: null}
  fsdp: {_set_: {granularity: layer, reshard_after_forward: true}}
optimizer:
  _set_: {name: adamw}
  config: {_set_: {lr: 6.0e-07, betas: [0.9, 0.95], weight_decay: 0.1}}
lr_scheduler:
  _set_: {name: cosine_annealing}
  config: {_set_: {num_warmup_steps: 0, final_lr: 1.1e-06, final_lr_scale: null}}
regime: {_set_: {num_steps: 800, num_data_epochs: 5, keep_last_n_checkpoints: 5, publish_metrics_every_n_steps: 5}}
common: {_set_: {seed: 1814}, metric_recorders: {wandb: {_set_: {enabled: false}}}}
"""


def test_2025_sectioned_form_converts_the_same_way():
    """The guide's SimPO example in fairseq2's 2025 form: final_lr above lr (6e-7 -> 1.1e-6) is kept, with a note."""
    conversion = convert_recipes([("simpo.yaml", yaml.safe_load(SECTIONED_SIMPO))])
    cfg = load_config_from(conversion)
    p = cfg.preference
    assert (p.criterion, p.criterion_config) == ("simpo", SimPOConfig(beta=2.0, gamma=1.0, nll_scale=0.0))
    assert (p.lr, p.final_lr, p.schedule_cycle_steps, p.max_steps, p.epochs) == (6e-7, 1.1e-6, 800, 800, 5)
    assert (p.grad_accum, p.max_grad_norm, p.seed, p.max_seq_len, p.max_num_tokens) == (4, None, 1814, 1024, 4096)
    assert (p.init, p.keep_checkpoints, cfg.sft.enabled) == ("base", 5, False)
    assert cfg.model.base == "meta-llama/Meta-Llama-3-8B"
    keys = {n.key for n in conversion.notes}
    assert {"gang.tensor_parallel_size", "common.metric_recorders"} <= keys  # gradient_accumulation: as is
    assert "dataset.name" in keys  # not an OpenAssistant-2 set: listed, data left to the user
    # and the rising lr is what fairseq2 runs: multiplier above 1 at the end of the cycle
    assert lr_lambda(p, total_steps=800)(799) == pytest.approx(1.1e-6 / 6e-7, rel=1e-4)


def load_config_from(conversion):
    from steps.config import config_from_dict

    return config_from_dict(yaml.safe_load(conversion.yaml()), "converted.yaml")


def test_null_means_null():
    recipe = {
        "model": "llama3_1_8b",
        "max_gradient_norm": None,
        "max_num_data_epochs": None,
        "max_num_steps": 300,
        "lr_scheduler_config": {"cycle_len": 200, "final_lr": 0.0},
        "keep_last_n_checkpoints": None,
    }
    cfg = load_config_from(convert_recipes([("sft.yaml", recipe)], nproc_per_node=1))
    assert cfg.sft.max_grad_norm is None
    assert (cfg.sft.max_steps, cfg.sft.epochs) == (300, 300)  # runs to max_steps whatever the epochs
    assert (cfg.sft.schedule_cycle_steps, cfg.sft.final_lr, cfg.sft.grad_accum) == (200, 0.0, 1)
    assert cfg.sft.seed == 2 and cfg.sft.lr == 5.5e-6  # fairseq2's defaults for what the file leaves out


def test_several_preference_recipes_fan_out_through_per_loss(shared_dir):
    dpo = yaml.safe_load((shared_dir / "fairseq2/dpo_config.yaml").read_text())
    sft = yaml.safe_load((shared_dir / "fairseq2/sft_config.yaml").read_text())
    orpo = {**dpo, "criterion": "orpo", "criterion_config": {"orpo_lambda": 0.2}, "model": "llama3_1_8b"}
    orpo["optimizer_config"] = {**dpo["optimizer_config"], "lr": 8.0e-6}
    cfg = load_config_from(convert_recipes([("sft", sft), ("dpo", dpo), ("orpo", orpo)]))
    resolved = {v.name: v.config.preference for v in plan_variants(cfg, "dpo,orpo").variants if v.name != "sft"}
    assert resolved["orpo"].criterion_config.orpo_lambda == 0.2 and resolved["orpo"].lr == 8.0e-6
    assert resolved["orpo"].criterion_config.nll_scale == 1.0  # fairseq2's ORPO default
    assert resolved["orpo"].init == "base" and resolved["dpo"].init == "sft"


@pytest.mark.parametrize(
    "name,hf_id",
    [
        ("llama3_1_8b", "meta-llama/Llama-3.1-8B"),
        ("llama3_1_8b_instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("llama3_8b", "meta-llama/Meta-Llama-3-8B"),
        ("llama3_8b_instruct", "meta-llama/Meta-Llama-3-8B-Instruct"),
        ("llama3_70b", "meta-llama/Meta-Llama-3-70B"),
        ("llama3_70b_instruct", "meta-llama/Meta-Llama-3-70B-Instruct"),
        ("llama3_1_70b", "meta-llama/Llama-3.1-70B"),
        ("llama3_1_70b_instruct", "meta-llama/Llama-3.1-70B-Instruct"),
        ("llama3_1_8b_instruct@user", "meta-llama/Llama-3.1-8B-Instruct"),
        ("checkpoint_step_240", "sft"),
        ("last_checkpoint", "sft"),
    ],
)
def test_model_names(name, hf_id):
    assert model_spec(name, "model")[0] == hf_id
    assert name.split("@")[0] in MODEL_IDS or hf_id == "sft"


@pytest.mark.parametrize(
    "recipe,key,expected",
    [
        ({"criterion": "dpo", "criterion_config": {"betta": 0.1}}, "criterion_config.betta", "did you mean 'beta'"),
        ({"criterion": "bco"}, "criterion", "dpo, simpo, orpo, cpo"),
        ({"optimizer": "sgd", "criterion": "simpo"}, "optimizer", "AdamW only"),
        ({"gradient_accumulation": "four"}, "gradient_accumulation", "expected an integer"),
        ({"model": "gpt5"}, "model", "no known Hugging Face id"),
        ({"lr_scheduler": "noam"}, "lr_scheduler", "cosine-annealing"),
    ],
)
def test_what_cannot_be_converted_fails_naming_file_and_key(recipe, key, expected):
    with pytest.raises(ConfigError) as err:
        convert_recipes([("x.yaml", recipe)])
    assert (err.value.source, err.value.key) == ("x.yaml", key), str(err.value)
    assert expected in str(err.value)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "steps.config", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_command_line_writes_a_config_the_flow_accepts(shared_dir, tmp_path):
    out = tmp_path / "from_fairseq2.yaml"
    files = [str(shared_dir / "fairseq2/sft_config.yaml"), str(shared_dir / "fairseq2/dpo_config.yaml")]
    proc = _cli("from-fairseq2", *files, "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"wrote {out}"
    assert all(line.split(":")[0] in ("mapped", "changed", "not applicable", "unknown") for line in lines[:-1])
    assert any(line.startswith(f"not applicable: {files[0]}: num_prefetch: ") for line in lines)
    cfg = load_config(out)
    assert cfg.preference.criterion == "dpo" and cfg.preference.reference == "sft"
    bad = tmp_path / "bad.yaml"
    bad.write_text("criterion: dpo\ncriterion_config: {gama: 1}\n")
    proc = _cli("from-fairseq2", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: {bad}: criterion_config.gama: unknown key; allowed keys: beta, nll_scale, label_smoothing, "
        "length_normalization, reference_model, reference_dtype, reference_tensor_parallel_size"
    )


# ----------------------------------------------------------------------------- a preference recipe alone


@pytest.fixture(scope="module")
def sft_model_dir(tmp_path_factory, tokenizer):
    """A saved Hugging Face directory standing for fairseq2's SFT checkpoint exported to Hugging Face format."""
    from tests.model_dirs import saved_tiny

    return saved_tiny(tmp_path_factory.mktemp("sft_export") / "checkpoint_step_240_hf", "tiny", tokenizer)


def test_a_lone_preference_recipe_starts_from_the_sft_model_given(shared_dir, sft_model_dir, tmp_path):
    """The guide's dpo_config.yaml (model and reference_model: checkpoint_step_240) without its SFT recipe: the
    checkpoint's Hugging Face export is model.base, the DPO run's init and reference; no SFT is trained."""
    from steps.train.recipes import resolve_init_and_reference

    conversion = convert_files([shared_dir / "fairseq2/dpo_config.yaml"], sft_model=str(sft_model_dir))
    out = tmp_path / "dpo_only.yaml"
    out.write_text(conversion.yaml())
    cfg = load_config(out)
    assert cfg.model.base == str(sft_model_dir.resolve()) and not cfg.sft.enabled
    assert (cfg.preference.init, cfg.preference.reference) == ("base", "base")
    plan = plan_variants(cfg, "dpo")
    assert [v.name for v in plan.variants] == ["dpo"]
    dpo = plan.variants[0].config
    assert dpo.preference.criterion_config == DPOConfig(beta=0.5, nll_scale=1.0)
    assert (dpo.preference.lr, dpo.preference.final_lr, dpo.preference.seed) == (1e-8, 5e-9, 666)
    # the training step starts from the directory and scores it as the reference
    assert resolve_init_and_reference(dpo, "dpo", dpo.preference, None) == (cfg.model.base, cfg.model.base)
    notes = {n.key: n for n in conversion.notes}
    assert notes["model"].kind == "changed" and "--sft-model" in notes["model"].message
    assert "the model.base of this run" in notes["criterion_config"].message
    assert not [n for n in conversion.notes if n.kind in ("unknown", "to fill")]


def test_a_lone_preference_recipe_without_the_sft_model_leaves_one_key_to_fill(shared_dir, tmp_path):
    """Without --sft-model the import still writes the whole config, says what to fill, and the flow's preflight
    refuses it with one line naming the key and --sft-model until model.base is a model PrefFlow can load."""
    from steps.config import preflight

    conversion = convert_files([shared_dir / "fairseq2/dpo_config.yaml"])
    (fill,) = [n for n in conversion.notes if n.kind == "to fill"]
    assert fill.key == "model" and "--sft-model DIR" in fill.message and "checkpoint_step_240" in fill.message
    assert conversion.config["model"]["base"] == "checkpoint_step_240" and conversion.config["sft"] == {
        "enabled": False
    }
    assert (conversion.config["preference"]["init"], conversion.config["preference"]["reference"]) == ("base", "base")
    assert "#   to fill: " in conversion.yaml()
    why = {n.key: n.message for n in conversion.notes if n.kind == "not applicable"}
    assert "--sft-model DIR" in why["resume_checkpoint_dir"]  # where the checkpoint to export lives
    out = tmp_path / "dpo_only.yaml"
    out.write_text(conversion.yaml())
    with pytest.raises(ConfigError) as err:
        load_config(out)
    assert (err.value.source, err.value.key) == (str(out), "model.base") and "--sft-model DIR" in str(err.value)
    assert preflight(["--config", "config", str(out), "run"]) == 2
    filled = tmp_path / "filled.yaml"
    filled.write_text(conversion.yaml().replace("base: checkpoint_step_240", "base: my-org/llama-3.1-8b-sft"))
    assert load_config(filled).model.base == "my-org/llama-3.1-8b-sft"


@pytest.mark.parametrize(
    "files,model,expected",
    [
        (["sft_config.yaml", "dpo_config.yaml"], "DIR", "the SFT model is trained from"),
        (["dpo_config.yaml"], "missing", "not a Hugging Face model directory"),
        (["orpo"], "DIR", "starts from 'llama3_1_8b', not a checkpoint"),
    ],
)
def test_sft_model_is_refused_where_it_cannot_be_the_start(shared_dir, sft_model_dir, tmp_path, files, model, expected):
    recipes = [(f, yaml.safe_load((shared_dir / "fairseq2" / f).read_text())) for f in files if f != "orpo"]
    if files == ["orpo"]:
        recipes = [("orpo.yaml", {"criterion": "orpo", "model": "llama3_1_8b"})]
    given = str(sft_model_dir) if model == "DIR" else str(tmp_path / model)
    with pytest.raises(ConfigError) as err:
        convert_recipes(recipes, sft_model=given)
    assert (err.value.source, err.value.key) == ("--sft-model", given) and expected in str(err.value)


def test_command_line_imports_a_lone_preference_recipe_with_its_sft_model(shared_dir, sft_model_dir, tmp_path):
    out = tmp_path / "dpo_only.yaml"
    recipe = str(shared_dir / "fairseq2/dpo_config.yaml")
    proc = _cli("from-fairseq2", recipe, "--sft-model", str(sft_model_dir), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith(f"changed: {recipe}: model: 'checkpoint_step_240'") for line in proc.stderr.splitlines())
    assert load_config(out).model.base == str(sft_model_dir.resolve())
    from steps.config import preflight

    assert preflight(["--config", "config", str(out), "show"]) == 0  # the flow's preflight accepts it
