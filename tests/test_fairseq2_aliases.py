"""fairseq2's loss snippets load verbatim: every ``criterion_config._type_`` of the guide's loss sections and example
configs (2024) and of fairseq2's 2025 recipes is an alias of a PrefFlow loss config; fairseq2-only fields map or
are noted; misspellings still fail. All of it is translated once, when the config is loaded: the typed config holds
PrefFlow's plain form and the loss modules know nothing of fairseq2."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from steps.config import ConfigError, for_loss, load_config
from steps.config import convert as config_convert
from steps.config.fairseq2_losses import FAIRSEQ2_LOSSES, loss_for_type, plain_config
from steps.losses.cpo import CPOConfig
from steps.losses.dpo import DPOConfig
from steps.losses.orpo import ORPOConfig
from steps.losses.simpo import SimPOConfig

PF = "fairseq2.recipes.lm.preference_finetune"
PF25 = "fairseq2.recipes.lm"
PF25_PRIVATE = "fairseq2.recipes.lm._preference_finetune"


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Notes are logged once per process; each test sees its own."""
    monkeypatch.setattr(config_convert, "_NOTED", set())


def load(tmp_path: Path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_config(path)


DPO_EXAMPLE = (
    f"{{_type_: {PF}.dpo.DpoConfig, reference_model: llama3_8b, reference_dtype: bfloat16, "
    "reference_tensor_parallel_size: 1, beta: 0.1, nll_scale: 0.0}"
)
DPO_RESULTS = (
    f"{{_type_: {PF}.dpo.DpoConfig, reference_model: checkpoint_step_240, reference_dtype: bfloat16, "
    "reference_tensor_parallel_size: 1, beta: 0.5, nll_scale: 1.0}"
)
SIMPO_GUIDE = f"{{_type_: {PF}.simpo.SimPOConfig, beta: 2.0, gamma: 1.0, nll_scale: 0.0}}"
ORPO_EXAMPLE = f"{{_type_: {PF}.orpo.ORPOConfig, orpo_lambda: 0.2, nll_scale: 1}}"
DPO_2025 = (
    f"{{_type_: {PF25}.DpoFinetuneConfig, reference_model: {{name: llama3_1_8b_instruct}}, "
    "reference_dtype: bfloat16, beta: 0.1, nll_scale: 0.0}"
)

# name: (criterion, criterion_config as the guide / fairseq2 writes it, the PrefFlow config it means)
SNIPPETS = {
    # the guide's own text (the paste) and its example configs: 2024 flat recipes
    "guide simpo": ("simpo", SIMPO_GUIDE, SimPOConfig(beta=2.0, gamma=1.0, nll_scale=0.0)),
    "example simpo, ints": (
        "simpo",
        f"{{_type_: {PF}.simpo.SimPOConfig, beta: 2, gamma: 1, nll_scale: 0}}",
        SimPOConfig(beta=2.0, gamma=1.0, nll_scale=0.0),
    ),
    "example orpo, guide spelling ORPOConfig": ("orpo", ORPO_EXAMPLE, ORPOConfig(orpo_lambda=0.2, nll_scale=1.0)),
    "fairseq2 OrpoConfig": (
        "orpo",
        f"{{_type_: {PF}.orpo.OrpoConfig, orpo_lambda: 0.1, nll_scale: 0.0}}",
        ORPOConfig(orpo_lambda=0.1, nll_scale=0.0),
    ),
    "example cpo, guide spelling CPOConfig": (
        "cpo",
        f"{{_type_: {PF}.cpo.CPOConfig, beta: 0.1, nll_scale: 1}}",
        CPOConfig(beta=0.1, nll_scale=1.0),
    ),
    "fairseq2 CpoConfig": (
        "cpo",
        f"{{_type_: {PF}.cpo.CpoConfig, beta: 0.1, nll_scale: 0.0}}",
        CPOConfig(beta=0.1, nll_scale=0.0),
    ),
    "example dpo": ("dpo", DPO_EXAMPLE, DPOConfig(beta=0.1, nll_scale=0.0)),
    "results dpo": ("dpo", DPO_RESULTS, DPOConfig(beta=0.5, nll_scale=1.0)),
    "dpo length_normalization": (
        "dpo",
        f"{{_type_: {PF}.dpo.DpoConfig, length_normalization: true}}",
        DPOConfig(length_normalization=True),
    ),
    # fairseq2's 2025 recipes: public and module paths, and the 2025 reference_model section
    "2025 DpoFinetuneConfig": ("dpo", DPO_2025, DPOConfig(beta=0.1, nll_scale=0.0)),
    "2025 SimPOFinetuneConfig": (
        "simpo",
        f"{{_type_: {PF25}.SimPOFinetuneConfig, beta: 2, nll_scale: 0.0}}",
        SimPOConfig(beta=2.0, gamma=0.5, nll_scale=0.0),
    ),
    "2025 OrpoFinetuneConfig": (
        "orpo",
        f"{{_type_: {PF25_PRIVATE}._orpo.OrpoFinetuneConfig, nll_scale: 0.0, orpo_lambda: 0.1}}",
        ORPOConfig(orpo_lambda=0.1, nll_scale=0.0),
    ),
    "2025 CpoFinetuneConfig": (
        "cpo",
        f"{{_type_: {PF25}.CpoFinetuneConfig, beta: 0.1, nll_scale: 0.0}}",
        CPOConfig(beta=0.1, nll_scale=0.0),
    ),
    "bare class name": ("dpo", "{_type_: DpoFinetuneConfig, beta: 0.3}", DPOConfig(beta=0.3)),
}


@pytest.mark.parametrize("case", sorted(SNIPPETS))
def test_guide_and_2025_snippets_load_in_a_prefflow_config(tmp_path, case):
    criterion, snippet, expected = SNIPPETS[case]
    cfg = load(tmp_path, f"preference: {{criterion: {criterion}, criterion_config: {snippet}}}\n")
    assert cfg.preference.criterion == criterion
    assert cfg.preference.criterion_config == expected


@pytest.mark.parametrize(
    "snippet,reference",
    [
        (f"{{_type_: {PF}.dpo.DpoConfig, reference_model: checkpoint_step_240}}", "sft"),
        (f"{{_type_: {PF}.dpo.DpoConfig, reference_model: checkpoint_step_100}}", "sft"),
        (f"{{_type_: {PF}.dpo.DpoConfig, reference_model: llama3_8b}}", "meta-llama/Meta-Llama-3-8B"),
        (f"{{_type_: {PF}.dpo.DpoConfig, reference_model: llama3_8b_instruct}}", "meta-llama/Meta-Llama-3-8B-Instruct"),
        (
            f"{{_type_: {PF25}.DpoFinetuneConfig, reference_model: {{name: llama3_1_70b_instruct}}}}",
            "meta-llama/Llama-3.1-70B-Instruct",
        ),
        (f"{{_type_: {PF}.dpo.DpoConfig, reference_model: my-org/my-sft}}", "my-org/my-sft"),
        (f"{{_type_: {PF}.dpo.DpoConfig}}", "auto"),  # left out: PrefFlow's own reference key decides
    ],
)
def test_reference_model_becomes_the_reference_spec(tmp_path, snippet, reference):
    cfg = load(tmp_path, f"preference: {{criterion: dpo, criterion_config: {snippet}}}\n")
    assert cfg.preference.reference == reference


def test_fairseq2_defaults_fill_what_the_snippet_leaves_out(tmp_path, caplog):
    """fairseq2's CPO beta and ORPO lambda are 1.0 (PrefFlow's 0.1): a fairseq2-typed snippet means fairseq2's."""
    with caplog.at_level(logging.WARNING):
        cpo = load(tmp_path, f"preference: {{criterion: cpo, criterion_config: {{_type_: {PF}.cpo.CpoConfig}}}}\n")
        orpo = load(
            tmp_path, f"preference: {{criterion: orpo, criterion_config: {{_type_: {PF25}.OrpoFinetuneConfig}}}}\n"
        )
    assert cpo.preference.criterion_config == CPOConfig(beta=1.0, nll_scale=1.0)
    assert orpo.preference.criterion_config == ORPOConfig(orpo_lambda=1.0, nll_scale=1.0)
    assert "fairseq2's defaults for the fields left out: beta=1.0 (PrefFlow's default 0.1)" in caplog.text
    # without _type_ the same mapping keeps PrefFlow's defaults
    plain = load(tmp_path, "preference: {criterion: cpo, criterion_config: {}}\n")
    assert plain.preference.criterion_config == CPOConfig()


def test_fairseq2_only_fields_get_one_line_notes_saying_why(tmp_path, caplog):
    snippet = DPO_RESULTS
    with caplog.at_level(logging.WARNING):
        load(tmp_path, f"preference: {{criterion: dpo, criterion_config: {snippet}}}\n")
        load(tmp_path, f"preference: {{criterion: dpo, criterion_config: {snippet}}}\n")  # parsed again: no repeat
    lines = [r.getMessage() for r in caplog.records]
    dtype = [m for m in lines if "criterion_config.reference_dtype" in m]
    tp = [m for m in lines if "criterion_config.reference_tensor_parallel_size" in m]
    assert len(dtype) == 1 and "no effect here" in dtype[0] and "model.dtype" in dtype[0]
    assert len(tp) == 1 and "no effect here" in tp[0] and "tensor parallelism" in tp[0]
    assert any("reference_model: -> reference: 'sft'" in m for m in lines)
    assert all("\n" not in m for m in lines)


def test_orpo_lambda_note_says_fairseq2_never_applied_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load(
            tmp_path,
            f"preference: {{criterion: orpo, criterion_config: {ORPO_EXAMPLE}}}\n",
        )
    assert cfg.preference.criterion_config.orpo_lambda == 0.2
    assert "effective lambda of 1.0" in caplog.text


@pytest.mark.parametrize(
    "criterion,snippet,key,expected",
    [
        ("dpo", f"{{_type_: {PF}.dpo.DpoConfig, betta: 0.1}}", "preference.criterion_config.betta", "'beta'?"),
        (
            "dpo",
            f"{{_type_: {PF}.dpo.DpoConfig, reference_modle: x}}",
            "preference.criterion_config.reference_modle",
            "did you mean 'reference_model'",
        ),
        (
            "simpo",
            f"{{_type_: {PF}.simpo.SimPOConfig, gama: 1.0}}",
            "preference.criterion_config.gama",
            "did you mean 'gamma'",
        ),
        (
            "simpo",
            f"{{_type_: {PF}.dpo.DpoConfig}}",
            "preference.criterion_config._type_",
            "it names the config of 'dpo'",
        ),
        ("dpo", f"{{_type_: {PF}.dpo.DPOConfigg}}", "preference.criterion_config._type_", "does not match"),
        ("dpo", "{_type_: torch.optim.AdamW}", "preference.criterion_config._type_", "DpoConfig / DpoFinetuneConfig"),
        (
            "dpo",
            f"{{_type_: {PF}.dpo.DpoConfig, reference_model: llama9_8b}}",
            "preference.criterion_config.reference_model",
            "no known Hugging Face id",
        ),
        ("dpo", f"{{_type_: {PF}.dpo.DpoConfig, beta: -1}}", "preference.criterion_config.beta", "-1"),
    ],
)
def test_misspelt_or_mismatched_fields_fail_clearly(tmp_path, criterion, snippet, key, expected):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"preference: {{criterion: {criterion}, criterion_config: {snippet}}}\n")
    assert err.value.key == key and err.value.source == str(tmp_path / "run.yaml"), str(err.value)
    assert expected in str(err.value)


def test_reference_model_and_reference_cannot_disagree(tmp_path):
    text = f"preference: {{criterion: dpo, reference: base, criterion_config: {DPO_RESULTS}}}\n"
    with pytest.raises(ConfigError, match="give only one of them") as err:
        load(tmp_path, text)
    assert err.value.key == "preference.criterion_config.reference_model"


def test_per_loss_fan_out_takes_fairseq2_snippets_too(tmp_path):
    cfg = load(
        tmp_path,
        f"""preference:
  criterion: dpo
  criterion_config: {DPO_RESULTS}
  per_loss:
    simpo: {{criterion_config: {SNIPPETS["guide simpo"][1]}}}
    cpo: {{criterion_config: {{_type_: {PF}.cpo.CpoConfig, nll_scale: 0}}}}
""",
    )
    assert for_loss(cfg, "simpo").preference.criterion_config == SimPOConfig(beta=2.0, gamma=1.0, nll_scale=0.0)
    assert for_loss(cfg, "cpo").preference.criterion_config == CPOConfig(beta=1.0, nll_scale=0.0)
    assert for_loss(cfg, "dpo").preference.reference == "sft"


@pytest.mark.parametrize(
    "type_path,loss",
    [
        (f"{PF}.dpo.DpoConfig", "dpo"),
        (f"{PF25}.DpoFinetuneConfig", "dpo"),
        (f"{PF}.simpo.SimPOConfig", "simpo"),
        (f"{PF25}.SimPOFinetuneConfig", "simpo"),
        (f"{PF}.orpo.OrpoConfig", "orpo"),
        (f"{PF}.orpo.ORPOConfig", "orpo"),
        (f"{PF25}.OrpoFinetuneConfig", "orpo"),
        (f"{PF}.cpo.CpoConfig", "cpo"),
        (f"{PF}.cpo.CPOConfig", "cpo"),
        (f"{PF25}.CpoFinetuneConfig", "cpo"),
        ("steps.losses.ipo.IPOConfig", "ipo"),
        ("somewhere.else.DpoConfig", None),  # fairseq2's class names count only under fairseq2.
        (f"{PF}.dpo.IPOConfig", None),
    ],
)
def test_registry_finds_the_loss_a_type_names(type_path, loss):
    assert loss_for_type(type_path) == loss


def test_losses_without_a_fairseq2_counterpart_have_no_names():
    assert "ipo" not in FAIRSEQ2_LOSSES and "hinge" not in FAIRSEQ2_LOSSES and "kto" not in FAIRSEQ2_LOSSES
    assert FAIRSEQ2_LOSSES["dpo"].section_fields == {"reference_model": "reference"}


def test_the_fairseq2_shape_is_translated_once_at_load_into_the_plain_form():
    """What the typed config sees: the loss's own fields (fairseq2's defaults filled) and the section's reference."""
    data = {
        "preference": {
            "criterion": "dpo",
            "criterion_config": {"_type_": f"{PF}.dpo.DpoConfig", "reference_model": "llama3_8b", "beta": 0.5},
            "per_loss": {"cpo": {"criterion_config": {"_type_": f"{PF25}.CpoFinetuneConfig", "nll_scale": 0}}},
        }
    }
    plain = plain_config(data)["preference"]
    assert plain["criterion_config"] == {"beta": 0.5, "nll_scale": 0.0, "length_normalization": False}
    assert plain["reference"] == "meta-llama/Meta-Llama-3-8B"
    assert plain["per_loss"] == {"cpo": {"criterion_config": {"nll_scale": 0, "beta": 1.0}}}
    assert data["preference"]["criterion_config"]["_type_"] == f"{PF}.dpo.DpoConfig"  # the input is left as it was
    ordinary = {"preference": {"criterion": "ipo", "criterion_config": {"beta": 0.2}}, "sft": {"lr": 1.0e-5}}
    assert plain_config(ordinary) == ordinary  # a plain section stays as it is


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo", "cpo", "ipo", "hinge", "kto"])
def test_loss_configs_know_nothing_of_fairseq2(name):
    import inspect

    from steps.losses import loss_class

    config_class = loss_class(name).config_class
    assert not hasattr(config_class, "fairseq2")
    assert "fairseq2" not in inspect.getsource(inspect.getmodule(config_class)).lower()
