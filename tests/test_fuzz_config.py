"""Fuzzed run configs and ``--set`` strings: every input ends in a valid plan or one ConfigError naming the file
(or ``--set``/``--loss``) and the key, never another exception; through the real CLI: exit 2, one line, no traceback.
Bounded and derandomized (hypothesis with a fixed seed), so the suite stays fast and repeatable."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steps.config import ConfigError, RunPlan, load_plan, parse_yaml_text, read_config_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs" / "default.yaml"
BASE = yaml.safe_load(DEFAULT.read_text())
FILE_EXAMPLES = 400
SET_EXAMPLES = 300
SOURCES_OF_ARGUMENTS = ("--set", "--loss", "--sweep")
FUZZ = settings(
    max_examples=FILE_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def _paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out += [path, *_paths(v, path)]
    return out


#: Every dotted key of the default config, plus keys it leaves out (nested dataclass sections, per-loss fields).
PATHS = sorted(
    set(_paths(BASE))
    | {
        "sft.lora.r",
        "sft.lora.enabled",
        "sft.betas",
        "sft.max_grad_norm",
        "sft.schedule_cycle_steps",
        "preference.reference",
        "preference.per_loss.simpo",
        "preference.per_loss.simpo.criterion_config",
        "preference.criterion_config._type_",
        "preference.criterion_config.reference_model",
        "evaluation.lc_assets_dir",
        "deployment.schedule_cron",
        "resources.nproc_per_node",
    }
)


def _get(node: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


SECTIONS = ["", *(p for p in _paths(BASE) if isinstance(_get(BASE, p), dict))]

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 1e308, -1e308, 5e-324, 2**63, 10**30, "5e-7", "nan", ".inf", "", "auto"]),
    st.sampled_from(["dpo", "simpo", "sft", "base", "none", "embedded", "fsdp", "cosine", "drop", "0 3 * * ? *"]),
    st.text(max_size=12),
    st.binary(max_size=4),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 3)), st.integers(-3, 3), max_size=2),
)
KEYS = st.one_of(st.text(max_size=10), st.integers(-3, 3), st.none(), st.booleans(), st.sampled_from(PATHS))


def _set(doc: dict, path: str, value: Any) -> None:
    parts = path.split(".") if path else []
    node = doc
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if parts:
        node[parts[-1]] = value


def _delete(doc: dict, path: str) -> None:
    parent, _, last = path.rpartition(".")
    node = _get(doc, parent) if parent else doc
    if isinstance(node, dict):
        node.pop(last, None)


@st.composite
def mutated_docs(draw) -> Any:
    """The default config after 1-4 mutations, or a document that is not a mapping at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.one_of(st.lists(VALUES, max_size=3), VALUES))  # a list or a scalar document
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["value", "value", "value", "unknown key", "delete", "section"]))
        if kind == "value":
            _set(doc, draw(st.sampled_from(PATHS)), draw(VALUES))
        elif kind == "unknown key":
            section = draw(st.sampled_from(SECTIONS))
            node = _get(doc, section) if section else doc
            if isinstance(node, dict):
                node[draw(KEYS)] = draw(VALUES)
        elif kind == "delete":
            _delete(doc, draw(st.sampled_from(PATHS)))
        else:
            _set(doc, draw(st.sampled_from(SECTIONS[1:])), draw(st.one_of(VALUES, st.lists(VALUES, max_size=2))))
    return doc


@st.composite
def config_bytes(draw) -> bytes:
    """YAML bytes of a mutated document, sometimes damaged as text: bytes that are not UTF-8, a cut, a tab."""
    doc = draw(mutated_docs())
    try:
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        text = yaml.safe_dump(str(doc))
    data = text.encode("utf-8")
    damage = draw(st.sampled_from(["none", "none", "none", "bytes", "cut", "insert"]))
    at = draw(st.integers(0, len(data)))
    if damage == "bytes":
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif damage == "cut":
        data = data[:at]
    elif damage == "insert":
        data = (
            data[:at]
            + draw(st.sampled_from([b"\t", b": ", b"- ", b"{", b"]", b"&a *a", b"!!python/tuple"]))
            + data[at:]
        )
    return data


def _check(path: Path, set_arg: str = "", loss_arg: str = "") -> str:
    """'ok' or 'error'; fails the test on anything but a RunPlan or a ConfigError naming the file/argument and key."""
    source, mapping = str(path), False
    try:
        data = parse_yaml_text(read_config_text(path), source)
        mapping = True
        plan = load_plan(data, source, set_arg, loss_arg)
    except ConfigError as exc:
        assert exc.source in (source, *SOURCES_OF_ARGUMENTS), str(exc)
        assert str(exc).startswith(f"{exc.source}: "), str(exc)
        if mapping:  # the file parsed to a mapping: the error names the key
            assert exc.key and str(exc).startswith(f"{exc.source}: {exc.key}: "), str(exc)
        return "error"
    assert isinstance(plan, RunPlan)
    return "ok"


def test_fuzzed_config_files_end_in_a_plan_or_one_clear_error(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "run.yaml"
    outcomes: Counter = Counter()

    @FUZZ
    @given(config_bytes())
    def one(data: bytes) -> None:
        path.write_bytes(data)
        outcomes[_check(path)] += 1

    one()
    print(f"fuzzed config files: {sum(outcomes.values())} cases, {dict(outcomes)}")
    assert sum(outcomes.values()) >= FILE_EXAMPLES // 2 and outcomes["error"] and outcomes["ok"]


SET_VALUES = st.one_of(
    VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
    st.text(max_size=12),
    st.sampled_from(["[", "{a: 1", "'", '"', "!!binary x", "*a", "&a", ": :", "1e999", "-.inf", "0x1F", "~"]),
)
SET_KEYS = st.one_of(st.sampled_from(PATHS), st.text(max_size=12), st.sampled_from(["", ".", "sft.", ".lr", "a..b"]))


@st.composite
def set_args(draw) -> str:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        form = draw(st.sampled_from(["k=v", "k=v", "k=v", "k", "=v", "k=v=v"]))
        key, value = draw(SET_KEYS), draw(SET_VALUES)
        items.append(form.replace("k", key, 1).replace("v", value, 1).replace("=v", f"={value}"))
    return " ".join(items)


LOSS_ARGS = st.one_of(
    st.just(""),
    st.sampled_from(["dpo", "sft", "dpo,simpo,orpo,cpo", "dpo,dpo", "kto", ",", "DPO, simpo"]),
    st.text(max_size=8),
)


def test_fuzzed_set_and_loss_arguments_end_in_a_plan_or_one_clear_error(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_set") / "run.yaml"
    path.write_text(DEFAULT.read_text())
    outcomes: Counter = Counter()

    @settings(FUZZ, max_examples=SET_EXAMPLES)
    @given(set_args(), LOSS_ARGS)
    def one(set_arg: str, loss_arg: str) -> None:
        outcomes[_check(path, set_arg, loss_arg)] += 1

    one()
    print(f"fuzzed --set/--loss: {sum(outcomes.values())} cases, {dict(outcomes)}")
    assert sum(outcomes.values()) >= SET_EXAMPLES // 2 and outcomes["error"] and outcomes["ok"]


# A few of the same mutations through the real command line (each is a Python process start: kept to a handful).
def _doc(**changes: Any) -> bytes:
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        _set(doc, path.replace("__", "."), value)
    return yaml.safe_dump(doc).encode()


CLI_CASES = {
    "list document": (b"- sft\n- preference\n", ""),
    "scalar document": (b"3.5\n", ""),
    "NaN lr": (_doc(sft__lr=math.nan), "sft.lr"),
    "huge epochs": (_doc(sft__epochs=-(10**30)), "sft.epochs"),
    "unknown key": (_doc(preference__betta=1), "preference.betta"),
    "section is a list": (_doc(evaluation=[1, 2]), "evaluation"),
    "non-UTF-8": (DEFAULT.read_bytes() + b"# \xff\xfe\n", ""),
    "wrong type deep": (_doc(preference__per_loss__orpo__criterion_config={"orpo_lambda": "much"}), "orpo_lambda"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_fuzzed_configs_through_the_real_cli(tmp_path, case):
    data, key = CLI_CASES[case]
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "USERNAME": "prefflow-test", "HF_HUB_OFFLINE": "1"}
    env["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(tmp_path / "mf")
    proc = subprocess.run(
        [sys.executable, str(REPO / "flows" / "pipeline.py"), "--config", "config", str(path), "show"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), lines
    assert key in lines[0]
