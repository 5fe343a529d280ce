"""Fuzzed KTO data (hypothesis, derandomized and bounded, like tests/test_data_fuzz.py): OpenAssistant rows with
arbitrary feedback, TRL unpaired rows, and pair files. Bad input is counted, never a crash; what is written is
checked against what was generated (labels recomputed here from the raw rows, pair splits from the pair files)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import strategies as st

from steps.config import DataConfig
from steps.data import DataError, OasstDataError, prepare_data, prepare_oasst
from steps.data.oasst import OasstOptions
from steps.data.records import pair_messages, unpaired_messages
from tests import test_data_fuzz as fuzz
from tests.test_data_fuzz import BAD_LINES, JSON_VALUES, TEXTS, VALID, corrupt, oasst_row, rows_of, write_lines
from tests.test_kto_data import emoji_rule, quality_rule

CASES = {"oasst": 60, "unpaired": 60, "pairs": 25}
SEEN: Counter = Counter()  # what the OpenAssistant cases wrote and checked (the test asserts it is not nothing)

QUALITY = st.tuples(st.sampled_from([0.0, 0.25, 0.49, 0.5, 0.6, 0.75, 0.9, 1.0]), st.integers(0, 4))
CLEAN_LABELS = st.builds(
    lambda quality, others: ({"quality": quality} if quality else {}) | others,
    st.one_of(st.none(), QUALITY, QUALITY, QUALITY),
    st.dictionaries(st.sampled_from(["spam", "fails_task", "pii", "humor"]), QUALITY, max_size=2),
)
CLEAN_EMOJIS = st.dictionaries(
    st.sampled_from(["+1", "-1", "+1", "-1", "red_flag", "_skip_reply"]), st.integers(0, 3), max_size=3
)


@st.composite
def feedback(draw) -> tuple[dict, bool]:
    """Labels and emojis in either OASST layout, and True when clean (its label is then recomputed here), or junk."""
    if draw(st.integers(0, 4)) == 0:
        return {"labels": draw(JSON_VALUES), "emojis": draw(JSON_VALUES)}, False
    labels, emojis = draw(CLEAN_LABELS), draw(CLEAN_EMOJIS)
    if draw(st.booleans()):  # flat rows' columns
        columns = {
            "name": list(labels),
            "value": [v for v, _ in labels.values()],
            "count": [c for _, c in labels.values()],
        }
        return {"labels": columns, "emojis": {"name": list(emojis), "count": list(emojis.values())}}, True
    return {"labels": {n: {"value": v, "count": c} for n, (v, c) in labels.items()}, "emojis": emojis}, True


REPLY_TEXTS = st.one_of(st.sampled_from(["Yes.", "No.", "Tea.", "Sure, tea.", "ok"]), TEXTS)


@st.composite
def conversation(draw, tree: str) -> list[tuple[dict, bool]]:
    """One tree of 2-8 messages (mostly alternating roles, sometimes not; some deleted, some German), each with
    feedback: OpenAssistant-like enough that replies survive the filters and reach the rule."""

    def row(k: int, parent: dict | None, role: str) -> tuple[dict, bool]:
        extra, clean = draw(feedback())
        message = {
            "message_id": f"{tree}-{k}",
            "parent_id": parent["message_id"] if parent else None,
            "text": draw(REPLY_TEXTS) if role == "assistant" else draw(st.sampled_from(["Tea?", "Why?", "Hi?"])),
            "role": role,
            "lang": draw(st.sampled_from(["en"] * 9 + ["de"])),
            "review_result": True,
            "deleted": draw(st.integers(0, 11)) == 0,
            "rank": draw(st.one_of(st.none(), st.integers(0, 3))) if role == "assistant" else None,
            "synthetic": False,
            "message_tree_id": tree,
            "tree_state": "ready_for_export",
            "created_date": draw(st.sampled_from(["2023-01-01", "2023-01-02"])),
            **extra,
        }
        return message, clean

    rows = [row(0, None, "prompter")]
    for k in range(1, draw(st.integers(2, 9))):
        parent = draw(st.sampled_from([r for r, _ in rows]))
        alternate = "assistant" if parent["role"] == "prompter" else "prompter"
        rows.append(row(k, parent, draw(st.sampled_from([alternate] * 5 + ["assistant"]))))
    return rows


OASST_INPUT = st.builds(
    lambda trees, junk: [m for tree in trees for m in tree] + [(r, False) for r in junk],
    st.tuples(conversation("T1"), conversation("T2"), conversation("T3")),
    st.lists(oasst_row(), max_size=2),
)


def run_cases(name: str, strategy, check, tmp_path_factory, record_property) -> None:
    fuzz.run_cases(name, strategy, check, tmp_path_factory, record_property, CASES[name.split(":")[0]])


def check_kto_files(out: Path, stats: dict, group_key: str) -> list[dict]:
    """Invariants of any written KTO files: counts, layout, unique ids, no group on both sides, the same sides as
    the SFT and pair files."""
    kto = rows_of(out, "kto")
    assert {s: len(r) for s, r in kto.items()} == stats["kto"]["split_sizes"]
    every = kto["train"] + kto["dev"]
    assert sum(r["label"] for r in every) == stats["kto"]["desirable"]
    assert sum(not r["label"] for r in every) == stats["kto"]["undesirable"]
    assert len({r["id"] for r in every}) == len(every)
    for row in every:
        prompt, completion, _ = unpaired_messages(row)
        assert prompt[-1]["role"] == "user" and completion.strip()
    sides = {r[group_key]: s for s, rows in kto.items() for r in rows}
    assert len(sides) == len({(r[group_key], s) for s, rows in kto.items() for r in rows})  # one side per group
    for kind in ("sft", "preference"):
        if (out / f"{kind}.train.jsonl").exists():
            for split, rows in rows_of(out, kind).items():
                assert all(sides.get(r[group_key], split) == split for r in rows)
    return every


def check_oasst(tmp: Path, example) -> None:
    (generated, bad), rule = example
    rows = [row for row, _ in generated]
    write_lines(tmp / "in.jsonl", rows, bad)
    try:
        stats = prepare_oasst(
            str(tmp / "in.jsonl"),
            tmp / "out",
            OasstOptions(sft_rank=None, require_review=False, feedback={"rule": rule}),
        ).stats
    except OasstDataError as exc:
        assert "JSON array" in str(exc) or "no usable conversation" in str(exc), exc
        SEEN["no usable input"] += 1
        return
    every = check_kto_files(tmp / "out", stats, "tree_id")
    SEEN[f"prepared ({rule})"] += 1
    kto = stats["kto"]
    if rule == "pairs":
        pairs = rows_of(tmp / "out", "preference")
        expected = {
            (json.dumps(prompt), text, label)
            for row in pairs["train"] + pairs["dev"]
            for prompt, chosen, rejected in [pair_messages(row)]
            for text, label in ((chosen, True), (rejected, False))
        }
        assert {(json.dumps(r["prompt"]), r["completion"][0]["content"], r["label"]) for r in every} == expected
        return
    assert sum(kto["labelled_by"].values()) == len(every) and kto["duplicates_removed"] == 0
    reference = quality_rule if rule == "quality" else emoji_rule
    ids = Counter(row.get("message_id") for row in rows)
    clean = {row["message_id"]: row for row, ok in generated if ok and ids[row.get("message_id")] == 1}
    checked = [row for row in every if row["id"] in clean]  # ids are message ids; repeated ids are left out
    SEEN.update({"kto rows": len(every), "labels recomputed": len(checked)})
    assert all(reference(clean[row["id"]])[0] is row["label"] for row in checked), checked


def test_fuzz_oasst_feedback(tmp_path_factory, record_property):
    strategy = st.tuples(
        st.tuples(OASST_INPUT, st.lists(st.tuples(st.integers(0, 30), BAD_LINES), max_size=2)),
        st.sampled_from(["quality", "emoji", "pairs"]),
    )
    run_cases("oasst", strategy, check_oasst, tmp_path_factory, record_property)
    print(f"oasst: {dict(SEEN)}")
    assert SEEN["labels recomputed"] >= 40, SEEN


# ------------------------------------------------------------------ TRL unpaired rows

ASSISTANT = st.builds(lambda text: [{"role": "assistant", "content": text}], TEXTS)
PROMPTS = st.one_of(
    TEXTS,
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "user", "assistant", "system", "bot"]), "content": TEXTS}
        ),
        max_size=3,
    ),
)
UNPAIRED = st.fixed_dictionaries(
    {"prompt": PROMPTS, "completion": st.one_of(TEXTS, ASSISTANT), "label": st.booleans()},
    optional={"id": st.sampled_from(["a", "b", 3, True, ""]), "prompt_id": st.sampled_from(["g1", "g2", None])},
)
UNPAIRED_ROWS = st.one_of(
    UNPAIRED,
    UNPAIRED,
    st.builds(
        lambda row, key, value: {**row, key: value},
        UNPAIRED,
        st.sampled_from(["prompt", "completion", "label"]),
        JSON_VALUES,
    ),
    st.builds(
        lambda row, key: {k: v for k, v in row.items() if k != key}, UNPAIRED, st.sampled_from(["prompt", "label"])
    ),
    JSON_VALUES,
)


def completion_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return value[0].get("content")
    return None


def check_unpaired(tmp: Path, example) -> None:
    rows, bad = example
    objects = [r for r in rows if isinstance(r, dict)]
    _, n_bad, array_first = write_lines(tmp / "in.jsonl", rows, bad)
    try:
        stats = prepare_data(DataConfig(format="unpaired", input=str(tmp / "in.jsonl")), tmp / "out").stats
    except DataError as exc:
        assert ("JSON array" in str(exc)) if array_first else ("no usable rows" in str(exc)), exc
        return
    assert stats["rows_read"] == len(objects)
    assert stats["malformed_lines"]["count"] == n_bad + len(rows) - len(objects)
    assert stats["rows_read"] == stats["rows_kept"] + sum(stats["dropped"].values())
    every = check_kto_files(tmp / "out", stats, "prompt_id")
    assert (
        len(every) == stats["rows_kept"] and stats["kto"]["duplicates_removed"] == stats["dropped"]["duplicate_example"]
    )
    # every kept row is one of the generated rows, label and texts unchanged
    generated = {
        (r["label"], completion_text(r.get("completion"))) for r in objects if isinstance(r.get("label"), bool)
    }
    assert {(r["label"], r["completion"][0]["content"]) for r in every} <= generated
    sft = rows_of(tmp / "out", "sft")
    desirable = {(json.dumps(r["prompt"]), r["completion"][0]["content"]) for r in every if r["label"]}
    assert {(json.dumps(r["prompt"]), r["response"]) for r in sft["train"] + sft["dev"]} == desirable


def test_fuzz_unpaired_rows(tmp_path_factory, record_property):
    strategy = st.tuples(
        st.lists(UNPAIRED_ROWS, max_size=14), st.lists(st.tuples(st.integers(0, 14), BAD_LINES), max_size=2)
    )
    run_cases("unpaired", strategy, check_unpaired, tmp_path_factory, record_property)


# ------------------------------------------------------------------ pair files -> KTO


def check_pairs_kto(tmp: Path, example) -> None:
    fmt, rows = example
    _, _, array_first = write_lines(tmp / "in.jsonl", rows, [])
    try:
        stats = prepare_data(DataConfig(format=fmt, input=str(tmp / "in.jsonl")), tmp / "out").stats
    except DataError as exc:
        assert ("JSON array" in str(exc)) if array_first else ("no usable rows" in str(exc)), exc
        return
    every = check_kto_files(tmp / "out", stats, "prompt_id")
    pairs = rows_of(tmp / "out", "preference")
    split = [pair_messages(row) for row in pairs["train"] + pairs["dev"]]
    expected = {(json.dumps(p), text, label) for p, c, r in split for text, label in ((c, True), (r, False))}
    got = [(json.dumps(r["prompt"]), r["completion"][0]["content"], r["label"]) for r in every]
    assert len(got) == len(set(got)) and set(got) == expected
    assert stats["kto"]["duplicates_removed"] == 2 * len(split) - len(expected)


@pytest.mark.parametrize("fmt", sorted(VALID))
def test_fuzz_pair_files_give_their_kto_split(tmp_path_factory, record_property, fmt):
    rows = st.lists(st.one_of(VALID[fmt], VALID[fmt], corrupt(fmt)), max_size=10)
    run_cases(f"pairs:{fmt}", st.tuples(st.just(fmt), rows), check_pairs_kto, tmp_path_factory, record_property)
