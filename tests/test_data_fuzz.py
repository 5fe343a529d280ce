"""Fuzzed inputs (hypothesis, derandomized and bounded): malformed rows, trees and lines are counted, never a crash.

Each test prints how many cases it tried (``pytest -s``); expected counts are computed here from what was generated.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steps.config import DataConfig
from steps.data import DataError, OasstDataError, pair_messages, prepare_data, prepare_oasst
from steps.data.oasst import OasstOptions

CASES = {"oasst_rows": 120, "oasst_trees": 100, "pairs": 60}
FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

HUGE = st.just(200_000).map(lambda n: "x" * n)  # built lazily: the strategy repr stays small
TEXTS = st.one_of(
    st.sampled_from(["", "  ", "Hi?", "Hello.", " Hello. ", "Why?", "Because.", "ok", "Tea?"]),
    st.text(max_size=12),
    HUGE,
)
IDS = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])
RANKS = st.one_of(st.none(), st.integers(-1, 4), st.sampled_from(["first", 1.5, 2.0, True, float("nan")]))
BAD_LINES = st.sampled_from(
    [
        "{not json",
        "[1, 2]",
        "42",
        '"text"',
        "null",
        '{"text": "\\ud800 lone"}',
        "\udcff\udcfe",
        "[" * 5000 + "]" * 5000,
        "{" + '"a":' * 3000,
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
OASST_KEYS = (
    "message_id",
    "parent_id",
    "text",
    "role",
    "lang",
    "review_result",
    "deleted",
    "rank",
    "synthetic",
    "message_tree_id",
    "tree_state",
    "created_date",
)


def write_lines(path: Path, objects: list, bad: list[tuple[int, str]]) -> tuple[int, int, bool]:
    """JSONL with ``bad`` lines inserted; (JSON objects written, bad lines written, first line opens an array)."""
    lines = [json.dumps(o) for o in objects]
    for position, line in bad:
        lines.insert(position % (len(lines) + 1), line)
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
    first = next((line for line in lines if line.strip()), "")
    return len(objects), len(bad), first.lstrip().startswith("[")


def rows_of(out: Path, kind: str) -> dict[str, list[dict]]:
    """Rows per split; lines end at "\n" only (texts may hold U+2028 and the like, which str.splitlines splits)."""
    return {
        split: [json.loads(line) for line in (out / f"{kind}.{split}.jsonl").read_bytes().split(b"\n") if line]
        for split in ("train", "dev")
    }


def check_written(out: Path, stats: dict, group_key: str) -> None:
    """Invariants of any successful prep: layouts, counts, distinct texts, unique ids, one side per group."""
    pairs, sft = rows_of(out, "preference"), rows_of(out, "sft")
    sizes = stats["split_sizes"]
    assert {s: len(r) for s, r in pairs.items()} == sizes["preference"]
    assert {s: len(r) for s, r in sft.items()} == sizes["sft"]
    every_pair = pairs["train"] + pairs["dev"]
    for row in every_pair:
        prompt, chosen, rejected = pair_messages(row)
        assert row["chosen"] == [{"role": "assistant", "content": chosen}]
        assert row["rejected"] == [{"role": "assistant", "content": rejected}]
        assert prompt[-1]["role"] == "user" and chosen.strip() and chosen.strip() != rejected.strip()
    assert len({r["id"] for r in every_pair}) == len(every_pair)
    assert len({r["id"] for r in sft["train"] + sft["dev"]}) == sizes["sft"]["train"] + sizes["sft"]["dev"]
    train_groups = {r[group_key] for r in pairs["train"] + sft["train"]}
    assert not train_groups & {r[group_key] for r in pairs["dev"] + sft["dev"]}
    fairseq2 = rows_of(out / "fairseq2", "preference")
    assert [r["id"] for r in fairseq2["train"]] == [r["id"] for r in pairs["train"]]


def run_cases(name: str, strategy, check, tmp_path_factory, record_property, cases: int | None = None) -> None:
    """Run ``check`` on hypothesis cases (``cases``, else CASES for the name's prefix) and record how many ran."""
    cases = cases or CASES[name.split(":")[0]]
    tried = 0

    @settings(FUZZ, max_examples=cases)
    @given(strategy)
    def case(example) -> None:
        nonlocal tried
        tried += 1
        with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
            check(Path(tmp), example)

    case()
    print(f"\n{name}: {tried} hypothesis cases tried")
    record_property(f"fuzz_cases:{name}", tried)
    assert tried >= cases // 2


# ------------------------------------------------------------------ OpenAssistant flat rows


@st.composite
def oasst_row(draw) -> dict:
    message_id = draw(IDS)
    row = {
        "message_id": message_id,
        "parent_id": draw(st.one_of(st.none(), IDS, st.just("ghost"))),
        "text": draw(TEXTS),
        "role": draw(st.sampled_from(["prompter", "assistant", "assistant", "robot", None])),
        "lang": draw(st.sampled_from(["en", "en", "de", None, 3])),
        "review_result": draw(st.sampled_from([True, True, False, None, "yes"])),
        "deleted": draw(st.booleans()),
        "rank": draw(RANKS),
        "synthetic": draw(st.sampled_from([False, False, True])),
        "message_tree_id": draw(st.sampled_from(["t1", "t2", None, message_id])),
        "tree_state": draw(st.sampled_from(["ready_for_export", "ready_for_export", "growing"])),
        "created_date": draw(st.sampled_from(["2023-01-01", "2023-01-02", None])),
    }
    for key in draw(st.sets(st.sampled_from(OASST_KEYS), max_size=2)):
        del row[key]
    return row


def check_oasst(tmp: Path, example) -> None:
    (objects, bad), strategy = example
    n_objects, n_bad, array_first = write_lines(tmp / "in.jsonl", objects, bad)
    try:
        stats = prepare_oasst(
            str(tmp / "in.jsonl"),
            tmp / "out",
            OasstOptions(pair_strategy=strategy, sft_rank=None, require_review=False),
        ).stats
    except OasstDataError as exc:
        assert ("JSON array" in str(exc)) if array_first else ("no usable conversation" in str(exc)), exc
        return
    assert not array_first
    if stats["format"] == "rows":
        assert stats["messages_read"] == n_objects
        assert stats["malformed_lines"]["count"] == n_bad
    assert stats["messages_read"] == stats["messages_kept"] + sum(stats["dropped"].values())
    check_written(tmp / "out", stats, "tree_id")


def test_fuzz_oasst_rows(tmp_path_factory, record_property):
    strategy = st.tuples(
        st.tuples(st.lists(oasst_row(), max_size=25), st.lists(st.tuples(st.integers(0, 30), BAD_LINES), max_size=3)),
        st.sampled_from(["best_vs_rest", "all_ordered_pairs"]),
    )
    run_cases("oasst_rows", strategy, check_oasst, tmp_path_factory, record_property)


# ------------------------------------------------------------------ OpenAssistant export trees


def tree_node(children):
    return st.fixed_dictionaries(
        {
            "message_id": IDS,
            "role": st.sampled_from(["prompter", "assistant", "assistant", "bot"]),
            "text": TEXTS,
            "lang": st.sampled_from(["en", "en", "fr"]),
            "review_result": st.sampled_from([True, True, False]),
            "rank": RANKS,
            "replies": children,
        },
        optional={"deleted": st.booleans(), "created_date": st.sampled_from(["a", "b"])},
    )


NODES = st.recursive(
    tree_node(st.just([])),
    lambda inner: tree_node(
        st.one_of(st.lists(st.one_of(inner, inner, inner, st.integers()), max_size=4), st.just("not a list"))
    ),
    max_leaves=12,
)


def expected_tree_counts(tree: dict) -> tuple[int, int]:
    """(messages, malformed records) the reader must report for one generated tree line."""
    if not isinstance(tree.get("prompt"), dict):
        return 0, 1
    messages = malformed = 0
    stack = [tree["prompt"]]
    while stack:
        node = stack.pop()
        messages += 1
        replies = node.get("replies")
        if isinstance(replies, list):
            malformed += sum(not isinstance(r, dict) for r in replies)
            stack.extend(r for r in replies if isinstance(r, dict))
    return messages, malformed


def deep_chain(depth: int) -> dict:
    node: dict = {"message_id": f"n{depth}", "role": "assistant", "text": "end", "rank": 0, "replies": []}
    for level in range(depth - 1, -1, -1):
        node = {
            "message_id": f"n{level}",
            "role": "prompter" if level % 2 == 0 else "assistant",
            "text": f"turn {level}",
            "rank": 0,
            "review_result": True,
            "lang": "en",
            "replies": [node],
        }
    return node


TREES = st.lists(
    st.fixed_dictionaries(
        {
            "message_tree_id": st.sampled_from(["T1", "T2", "T3"]),
            "tree_state": st.sampled_from(["ready_for_export"] * 3 + ["growing"]),
            "prompt": st.one_of(NODES, NODES, NODES, st.builds(deep_chain, st.integers(1, 300)), st.just(None)),
        }
    ),
    min_size=1,
    max_size=5,
)


def check_trees(tmp: Path, example) -> None:
    trees, bad = example
    expected = [expected_tree_counts(t) for t in trees]
    _, n_bad, array_first = write_lines(tmp / "in.trees.jsonl", trees, bad)
    try:
        stats = prepare_oasst(
            str(tmp / "in.trees.jsonl"),
            tmp / "out",
            OasstOptions(pair_strategy="all_ordered_pairs", sft_rank=None, tree_states=None, langs=None),
        ).stats
    except OasstDataError as exc:
        assert ("JSON array" in str(exc)) if array_first else ("no usable conversation" in str(exc)), exc
        return
    assert stats["format"] == "trees"
    assert stats["messages_read"] == sum(m for m, _ in expected)
    assert stats["malformed_lines"]["count"] == sum(b for _, b in expected) + n_bad
    assert stats["messages_read"] == stats["messages_kept"] + sum(stats["dropped"].values())
    check_written(tmp / "out", stats, "tree_id")


def test_fuzz_oasst_trees(tmp_path_factory, record_property):
    strategy = st.tuples(TREES, st.lists(st.tuples(st.integers(1, 10), BAD_LINES), max_size=2))
    run_cases("oasst_trees", strategy, check_trees, tmp_path_factory, record_property)


# ------------------------------------------------------------------ preference formats

MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": TEXTS}),
    max_size=4,
)
LLAMA3 = "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>"
VALID = {
    "preference": st.one_of(
        st.fixed_dictionaries({"prompt": TEXTS, "chosen": TEXTS, "rejected": TEXTS}),
        st.fixed_dictionaries({"chosen": TEXTS, "rejected": TEXTS}),
        st.fixed_dictionaries({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES}),
        st.builds(
            lambda p, c, r: {
                "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
            },
            TEXTS,
            TEXTS,
            TEXTS,
        ),
    ),
    "hh_rlhf": st.builds(
        lambda p, c, r: {
            "chosen": f"\n\nHuman: {p}\n\nAssistant: {c}",
            "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}",
        },
        TEXTS,
        TEXTS,
        TEXTS,
    ),
    "ultrafeedback": st.builds(
        lambda p, c, r, i, s: {
            "prompt": p,
            "prompt_id": i,
            "score_chosen": s,
            "score_rejected": 1.0,
            "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
            "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
        },
        TEXTS,
        TEXTS,
        TEXTS,
        st.sampled_from(["p1", "p2", "p3"]),
        st.one_of(st.floats(), st.just("8")),
    ),
    "fairseq2": st.one_of(
        st.builds(
            lambda p, c, r, s: {
                "src": LLAMA3.format("user", p) + "<|start_header_id|>assistant<|end_header_id|>\n\n",
                "tgt_chosen": c,
                "tgt_rejected": r,
                "reference_score_chosen": s,
                "reference_score_rejected": -2.0,
            },
            TEXTS,
            TEXTS,
            TEXTS,
            st.one_of(st.floats(), st.none()),
        ),
        st.fixed_dictionaries({"src": TEXTS, "tgt": TEXTS}, optional={"id": st.sampled_from(["x", "y", 3, True])}),
    ),
}


def corrupt(fmt: str):
    """A valid row with a field replaced by an arbitrary JSON value, a key dropped, or an arbitrary value."""
    keys = st.sampled_from(["prompt", "chosen", "rejected", "src", "tgt", "tgt_chosen", "id", "prompt_id"])
    return st.one_of(
        st.builds(lambda row, key, value: {**row, key: value}, VALID[fmt], keys, JSON_VALUES),
        st.builds(lambda row, key: {k: v for k, v in row.items() if k != key}, VALID[fmt], keys),
        JSON_VALUES,
    )


def check_pairs(tmp: Path, example) -> None:
    fmt, (rows, bad) = example
    objects = [r for r in rows if isinstance(r, dict)]
    not_objects = len(rows) - len(objects)
    _, n_bad, array_first = write_lines(tmp / "in.jsonl", rows, bad)
    try:
        stats = prepare_data(DataConfig(format=fmt, input=str(tmp / "in.jsonl")), tmp / "out").stats
    except DataError as exc:
        assert ("JSON array" in str(exc)) if array_first else ("no usable rows" in str(exc)), exc
        return
    assert stats["rows_read"] == len(objects)
    assert stats["malformed_lines"]["count"] == n_bad + not_objects
    assert stats["rows_read"] == stats["rows_kept"] + sum(stats["dropped"].values())
    check_written(tmp / "out", stats, "prompt_id")


@pytest.mark.parametrize("fmt", sorted(VALID))
def test_fuzz_preference_formats(tmp_path_factory, record_property, fmt):
    rows = st.lists(st.one_of(VALID[fmt], VALID[fmt], corrupt(fmt)), max_size=12)
    strategy = st.tuples(st.just(fmt), st.tuples(rows, st.lists(st.tuples(st.integers(0, 12), BAD_LINES), max_size=2)))
    run_cases(f"pairs:{fmt}", strategy, check_pairs, tmp_path_factory, record_property)
