"""GenerationSettings: the one validator of generation knobs (each bad value names its field)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from steps.evaluate.generation import GenerationError as ReExported
from steps.evaluate.settings import GenerationError, GenerationSettings


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.0),
        ("max_new_tokens", True),
        ("batch_size", 0),
        ("batch_size", -3),
        ("batch_size", "8"),
        ("seed", 1.5),
        ("seed", None),
        ("seed", False),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "0.9"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_p", True),
    ],
)
def test_bad_value_names_its_field(field, value):
    with pytest.raises(GenerationError, match=field) as err:
        GenerationSettings(**{field: value})
    assert err.value.field == field


@pytest.mark.parametrize("temperature, do_sample", [(0, False), (0.0, False), (1e-6, True), (0.9, True), (2, True)])
def test_temperature_zero_means_greedy(temperature, do_sample):
    assert GenerationSettings(temperature=temperature).do_sample is do_sample


def test_defaults_are_the_reference_recipe():
    # the evaluation companion of the reference recipe sampled at temperature 0.9, top_p 1, seed 1814
    assert GenerationSettings() == GenerationSettings(
        max_new_tokens=256, temperature=0.9, top_p=1.0, seed=1814, batch_size=16
    )


def test_record_and_from_config():
    settings = GenerationSettings(max_new_tokens=6, temperature=0.0, top_p=0.5, seed=3, batch_size=2)
    assert settings.record() == {
        "max_new_tokens": 6,
        "temperature": 0.0,
        "top_p": 0.5,
        "seed": 3,
        "batch_size": 2,
        "do_sample": False,
    }
    section = SimpleNamespace(max_new_tokens=6, temperature=0.0, top_p=0.5, seed=3, batch_size=2, judge="x")
    assert GenerationSettings.from_config(section) == settings
    with pytest.raises(GenerationError, match="top_p"):
        GenerationSettings.from_config(SimpleNamespace(**{**vars(section), "top_p": 2.0}))


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        GenerationSettings().temperature = 0.0  # type: ignore[misc]


def test_error_importable_from_generation():
    assert ReExported is GenerationError
