"""KTO data: OpenAssistant replies labelled by their feedback, TRL unpaired rows, pair files split in two.

Hand-countable fixtures say their expected counts in comments; the real OpenAssistant files are checked against
``reference_kto`` below, a separate implementation that walks the raw rows (it shares no code with steps.data).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import pytest

from steps.config import ConfigError, config_from_dict
from steps.config.schema import DataConfig
from steps.data import DataError, prepare_data, prepare_oasst
from steps.data.oasst import OasstOptions
from steps.data.oasst_feedback import OasstFeedbackRule, encode_feedback
from steps.data.records import RecordError, unpaired_messages
from tests.test_oasst import load_raw_rows, own_drop_reason

FLAGS = ("spam", "fails_task", "lang_mismatch", "pii", "not_appropriate", "hate_speech")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


def kto_rows(out: Path) -> dict[str, list[dict]]:
    return {split: read_jsonl(out / f"kto.{split}.jsonl") for split in ("train", "dev")}


# ---------------------------------------------------------------- independent reference


def raw_labels(row: dict) -> dict[str, tuple[float, int]]:
    labels = row.get("labels") or {}
    if "name" in labels:
        return {n: (v, c) for n, v, c in zip(labels["name"], labels["value"], labels["count"])}
    return {n: (d["value"], d["count"]) for n, d in labels.items()}


def raw_emojis(row: dict) -> dict[str, int]:
    emojis = row.get("emojis") or {}
    return dict(zip(emojis["name"], emojis["count"])) if "name" in emojis else dict(emojis)


def quality_rule(row: dict) -> tuple[bool | None, str]:
    labels = raw_labels(row)
    if any(labels.get(f, (0.0, 0))[1] > 0 and labels[f][0] >= 0.5 for f in FLAGS):
        return False, "flagged"
    value, votes = labels.get("quality", (None, 0))
    if not votes:
        return None, "no_quality_label"
    if votes < 2:
        return None, "few_quality_votes"
    if value >= 0.75:
        return True, "high_quality"
    return (False, "low_quality") if value < 0.5 else (None, "middling_quality")


def emoji_rule(row: dict) -> tuple[bool | None, str]:
    emojis = raw_emojis(row)
    if emojis.get("red_flag", 0):
        return False, "red_flag"
    net = emojis.get("+1", 0) - emojis.get("-1", 0)
    if net >= 1:
        return True, "net_up_votes"
    if net <= -1:
        return False, "net_down_votes"
    return None, "no_votes" if not emojis.get("+1") and not emojis.get("-1") else "tied_votes"


def reference_kto(rows: list[dict], rule) -> tuple[Counter, dict[str, bool]]:
    """Counts per outcome and {message id: label} of kept assistant replies with a user/assistant history,
    one per distinct (history, text), the first in the walk's order (rank, unranked last, date, id)."""
    by_id = {r["message_id"]: r for r in rows}

    def kept(r):
        while True:
            if own_drop_reason(r, ("en",), True, False):
                return False
            if r["parent_id"] is None:
                return True
            r = by_id.get(r["parent_id"])
            if r is None:
                return False

    def history(r):
        chain = []
        while r["parent_id"] is not None:
            r = by_id[r["parent_id"]]
            chain.append(("user" if r["role"] == "prompter" else "assistant", r["text"]))
        return tuple(reversed(chain))

    replies = [r for r in rows if r["role"] == "assistant" and r["parent_id"] is not None and kept(r)]
    replies.sort(
        key=lambda r: (r.get("rank") is None, r.get("rank") or 0, r.get("created_date") or "", r["message_id"])
    )
    counts, labels, seen = Counter(), {}, set()
    for r in replies:
        h = history(r)
        if len(h) % 2 == 0 or any(role != ("user" if i % 2 == 0 else "assistant") for i, (role, _) in enumerate(h)):
            counts["non_alternating_history"] += 1
            continue
        if (h, r["text"]) in seen:
            counts["repeated_reply"] += 1
            continue
        seen.add((h, r["text"]))
        label, reason = rule(r)
        counts[reason] += 1
        if label is not None:
            labels[r["message_id"]] = label
    return counts, labels


# ---------------------------------------------------------------- hand-countable OpenAssistant fixture


def message(text, role, parent=None, rank=None, labels=None, emojis=None, **overrides):
    row = {
        "message_id": str(uuid.uuid4()),
        "parent_id": parent["message_id"] if parent else None,
        "created_date": "2023-05-01T00:00:00+00:00",
        "text": text,
        "role": role,
        "lang": "en",
        "review_result": True,
        "deleted": False,
        "rank": rank,
        "synthetic": False,
        "tree_state": "ready_for_export",
        "labels": None
        if labels is None
        else {"name": list(labels), "value": [v for v, _ in labels.values()], "count": [c for _, c in labels.values()]},
        "emojis": None if emojis is None else {"name": list(emojis), "count": list(emojis.values())},
    }
    row.update(overrides)
    return row


def fixture_rows() -> list[dict]:
    """Two trees. Quality rule: a1, a7 desirable; a2 (low), a4 (flagged), b1 (low) undesirable; a3, a8 middling;
    a5 one vote; a6 unrated; b3 repeats b1's text; b2 deleted (never a candidate). Emoji rule: a1 desirable;
    a2 (down vote), a4 (red flag) undesirable; a3 tied; the other five have no votes."""
    p1 = message("Name a tea?", "prompter")
    a1 = message("Green tea.", "assistant", p1, 0, {"quality": (0.9, 3), "spam": (0.0, 3)}, {"+1": 2})
    a2 = message("No.", "assistant", p1, 1, {"quality": (0.3, 3)}, {"-1": 1})
    a3 = message("Some tea.", "assistant", p1, 2, {"quality": (0.6, 3)}, {"+1": 1, "-1": 1})
    a4 = message(
        "Coffee.", "assistant", p1, 3, {"quality": (0.9, 3), "fails_task": (0.67, 3)}, {"red_flag": 1, "+1": 3}
    )
    a5 = message("Black tea.", "assistant", p1, None, {"quality": (0.8, 1)})
    a6 = message("Oolong.", "assistant", p1, None)
    p2 = message("Another?", "prompter", a1)
    a7 = message("White tea.", "assistant", p2, 0, {"quality": (0.75, 4)})
    a8 = message("Tea.", "assistant", p2, 1, {"quality": (0.5, 3)})
    q1 = message("Name a fruit?", "prompter")
    b1 = message("Rock.", "assistant", q1, 0, {"quality": (0.25, 2)})
    b2 = message("Apple.", "assistant", q1, 1, {"quality": (1.0, 3)}, deleted=True)
    b3 = message("Rock.", "assistant", q1, 2, {"quality": (1.0, 3)})
    rows = [p1, a1, a2, a3, a4, a5, a6, p2, a7, a8, q1, b1, b2, b3]
    for row in rows:
        row["message_tree_id"] = (p1 if row in rows[:10] else q1)["message_id"]
    return rows


def as_trees(rows: list[dict]) -> list[dict]:
    """The same messages in the export's trees layout (labels {name: {value, count}}, emojis {name: count})."""
    nodes = {}
    for r in rows:
        node = {k: v for k, v in r.items() if k not in ("labels", "emojis", "tree_state", "message_tree_id")}
        labels = raw_labels(r)
        if labels:
            node["labels"] = {n: {"value": v, "count": c} for n, (v, c) in labels.items()}
        if r["emojis"]:
            node["emojis"] = raw_emojis(r)
        node["replies"] = []
        nodes[r["message_id"]] = node
    trees = []
    for r in rows:
        if r["parent_id"] is None:
            trees.append(
                {"message_tree_id": r["message_id"], "tree_state": "ready_for_export", "prompt": nodes[r["message_id"]]}
            )
        else:
            nodes[r["parent_id"]]["replies"].append(nodes[r["message_id"]])
    return trees


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("layout", ["rows", "trees"])
def test_fixture_counts_by_the_quality_rule(tmp_path, layout):
    rows = fixture_rows()
    path = write_jsonl(tmp_path / "in.jsonl", rows if layout == "rows" else as_trees(rows))
    stats = prepare_oasst(str(path), tmp_path / "out", OasstOptions(dev_fraction=0.5)).stats["kto"]
    assert (stats["desirable"], stats["undesirable"]) == (2, 3)
    assert stats["labelled_by"] == {"high_quality": 2, "low_quality": 2, "flagged": 1}
    assert stats["skipped"] == {
        "no_quality_label": 1,
        "few_quality_votes": 1,
        "middling_quality": 2,
        "non_alternating_history": 0,
        "repeated_reply": 1,
    }
    written = kto_rows(tmp_path / "out")
    by_text = {r["completion"][0]["content"]: r for split in written.values() for r in split}
    assert {t: r["label"] for t, r in by_text.items()} == {
        "Green tea.": True,
        "White tea.": True,
        "No.": False,
        "Coffee.": False,
        "Rock.": False,
    }
    assert by_text["Coffee."]["feedback"] == {"quality": 0.9, "quality_votes": 3, "flags": ["fails_task"]}
    assert by_text["White tea."]["prompt"] == [
        {"role": "user", "content": "Name a tea?"},
        {"role": "assistant", "content": "Green tea."},
        {"role": "user", "content": "Another?"},
    ]
    # one tree per side; every KTO row on its tree's side of the SFT / pair split
    sft_sides = {r["tree_id"]: s for s in ("train", "dev") for r in read_jsonl(tmp_path / "out" / f"sft.{s}.jsonl")}
    assert {r["tree_id"]: s for s, split in written.items() for r in split} == sft_sides
    assert stats["split_sizes"] == {s: len(written[s]) for s in ("train", "dev")}


def test_fixture_counts_by_the_emoji_rule(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", fixture_rows())
    stats = prepare_oasst(str(path), tmp_path / "out", OasstOptions(feedback={"rule": "emoji"})).stats["kto"]
    assert (stats["desirable"], stats["undesirable"]) == (1, 2)
    assert stats["labelled_by"] == {"net_up_votes": 1, "net_down_votes": 1, "red_flag": 1}
    assert stats["skipped"]["tied_votes"] == 1 and stats["skipped"]["no_votes"] == 5
    assert stats["rule"] == {"rule": "emoji", "min_net_votes": 1}


def test_pairs_rule_splits_the_written_pairs(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", fixture_rows())
    prepared = prepare_oasst(str(path), tmp_path / "out", OasstOptions(feedback=OasstFeedbackRule(rule="pairs")))
    pairs = read_jsonl(tmp_path / "out" / "preference.train.jsonl") + read_jsonl(
        tmp_path / "out" / "preference.dev.jsonl"
    )
    # best_vs_rest: a1 vs a2, a3, a4; a7 vs a8; b1 vs b3 is identical text -> skipped; a1 is chosen three times
    assert len(pairs) == 4
    stats = prepared.stats["kto"]
    assert (stats["desirable"], stats["undesirable"], stats["duplicates_removed"]) == (2, 4, 2)


def test_thresholds_move_the_counts(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", fixture_rows())
    rule = {"desirable_min_quality": 0.6, "undesirable_below_quality": 0.6, "flags": [], "min_quality_votes": 1}
    stats = prepare_oasst(str(path), tmp_path / "out", OasstOptions(feedback=rule)).stats["kto"]
    # a1 0.9, a3 0.6, a4 0.9 (no flags counted now), a5 0.8 (one vote now enough), a7 0.75 -> desirable;
    # a2 0.3, a8 0.5, b1 0.25 -> undesirable; a6 unrated
    assert (stats["desirable"], stats["undesirable"]) == (5, 3)
    assert stats["skipped"]["no_quality_label"] == 1 and stats["skipped"]["middling_quality"] == 0


def test_feedback_encoding_reads_both_layouts_and_skips_junk():
    rows = {"name": ["quality", "spam", 3, "x"], "value": [0.5, "high", 0.1, float("nan")], "count": [3, 3, 1, 2]}
    assert json.loads(encode_feedback(rows, None)) == {"l": {"quality": [0.5, 3]}, "e": {}}
    trees = {"quality": {"value": 0.75, "count": 2}, "spam": {"value": 0.0, "count": -1}, "bad": 3}
    assert json.loads(encode_feedback(trees, {"+1": 2, "-1": 1.5, "_skip_reply": 1})) == {
        "l": {"quality": [0.75, 2]},
        "e": {"+1": 2, "_skip_reply": 1},
    }
    assert encode_feedback(None, None) is None and encode_feedback({"name": [1]}, "x") is None
    assert encode_feedback({"name": ["a"], "value": [1.0]}, {"name": ["+1"], "count": []}) is None


# ---------------------------------------------------------------- real OpenAssistant data


@pytest.mark.parametrize(("rule", "reference"), [("quality", quality_rule), ("emoji", emoji_rule)])
def test_real_rows_file_matches_the_reference(shared_dir, tmp_path, rule, reference):
    path = shared_dir / "oasst" / "oasst1_en_validation.part1.messages.jsonl"
    stats = prepare_oasst(str(path), tmp_path / "out", OasstOptions(feedback={"rule": rule})).stats["kto"]
    counts, labels = reference_kto(load_raw_rows(path), reference)
    written = [r for split in kto_rows(tmp_path / "out").values() for r in split]
    assert {r["id"]: r["label"] for r in written} == labels
    assert stats["desirable"] == sum(labels.values()) and stats["undesirable"] == len(labels) - sum(labels.values())
    assert {k: v for k, v in stats["skipped"].items() if v} == {
        k: v for k, v in counts.items() if k in stats["skipped"] and v
    }
    assert stats["labelled_by"] == {k: v for k, v in counts.items() if k not in stats["skipped"]}
    quoted = {"quality": (305, 119, 181), "emoji": (306, 91, 208)}  # the numbers oasst_feedback's docstring quotes
    assert (stats["desirable"], stats["undesirable"], sum(stats["skipped"].values())) == quoted[rule]


def test_real_trees_file_has_votes_but_no_quality_labels(shared_dir, tmp_path):
    path = shared_dir / "oasst" / "oasst_en100_ready.trees.jsonl"
    quality = prepare_oasst(str(path), tmp_path / "q").stats["kto"]
    assert quality["desirable"] == quality["undesirable"] == 0
    counts, _ = reference_kto(load_raw_rows(path), quality_rule)
    assert quality["skipped"]["no_quality_label"] == counts["no_quality_label"] == 670
    emoji = prepare_oasst(str(path), tmp_path / "e", OasstOptions(feedback={"rule": "emoji"})).stats["kto"]
    counts, labels = reference_kto(load_raw_rows(path), emoji_rule)
    assert (emoji["desirable"], emoji["undesirable"]) == (sum(labels.values()), len(labels) - sum(labels.values()))
    assert emoji["skipped"]["no_votes"] == counts["no_votes"]
    assert (emoji["desirable"], emoji["undesirable"]) == (333, 99)


# ---------------------------------------------------------------- TRL unpaired rows (data.format: unpaired)

HI = [{"role": "user", "content": "Hi?"}]


def unpaired_lines() -> list[str]:
    """14 lines: 1 malformed, 13 rows of which 5 are kept (rows 1, 2, 9, 10, 12) and 8 dropped, one per reason
    (duplicate_id and duplicate_example once each)."""
    rows = [
        {"prompt": "Hi?", "completion": "Hello.", "label": True},  # 1 kept (standard)
        {"prompt": HI, "completion": [{"role": "assistant", "content": "Go away."}], "label": False},  # 2 kept
        {"prompt": "Hi?", "completion": "Hey."},  # 3 missing_field
        {"prompt": "Hi?", "completion": "Hey.", "label": "yes"},  # 4 invalid_field
        {"prompt": "Hi?", "completion": "  ", "label": True},  # 5 empty_response
        {"prompt": HI + [{"role": "assistant", "content": "?"}], "completion": "Hey.", "label": True},  # 6 not user
        {"prompt": HI, "completion": [{"role": "assistant", "content": "a"}] * 2, "label": True},  # 7 multi_turn
        {"prompt": "Hi?", "completion": "Hello.", "label": True},  # 8 duplicate_example of 1
        {"prompt": "Hi?", "completion": "Hello.", "label": False},  # 9 kept: conflicts with 1
        {"id": "x", "prompt_id": "g", "prompt": "Tea?", "completion": "Yes.", "label": True},  # 10 kept
        {"id": "x", "prompt": "Tea?", "completion": "No.", "label": False},  # 11 duplicate_id
        {"prompt_id": "g", "prompt": "Tea?", "completion": "Green.", "label": False},  # 12 kept
        {"prompt": [{"role": "robot", "content": "Hi?"}], "completion": "Hey.", "label": True},  # 13 invalid_message
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "{not json")
    return lines


def test_unpaired_rows_are_read_counted_and_split(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(unpaired_lines()) + "\n", encoding="utf-8")
    prepared = prepare_data(DataConfig(format="unpaired", input=str(path), dev_fraction=0.5), tmp_path / "out")
    stats = prepared.stats
    assert stats["malformed_lines"]["count"] == 1 and stats["rows_read"] == 13 and stats["rows_kept"] == 5
    assert {k: v for k, v in stats["dropped"].items() if v} == {
        "missing_field": 1,
        "invalid_field": 1,
        "empty_response": 1,
        "prompt_not_ending_with_user": 1,
        "multi_turn_completion": 1,
        "duplicate_example": 1,
        "duplicate_id": 1,
        "invalid_message": 1,
    }
    assert stats["rows_read"] == stats["rows_kept"] + sum(stats["dropped"].values())
    kto = stats["kto"]
    assert (kto["desirable"], kto["undesirable"], kto["conflicting_labels"]) == (2, 3, 1)
    written = kto_rows(tmp_path / "out")
    every = written["train"] + written["dev"]
    assert len(every) == 5 and len({r["id"] for r in every}) == 5
    for row in every:
        prompt, completion, label = unpaired_messages(row)
        assert prompt[-1]["role"] == "user" and completion.strip() and isinstance(label, bool)
    # groups: "Hi?" (rows 1, 2, 9) and "g" (rows 10, 12): one per side, never split
    groups = {s: {r["prompt_id"] for r in rows} for s, rows in written.items()}
    assert len(groups["train"]) == len(groups["dev"]) == 1 and not groups["train"] & groups["dev"]
    sft = read_jsonl(tmp_path / "out" / "sft.train.jsonl") + read_jsonl(tmp_path / "out" / "sft.dev.jsonl")
    assert sorted(r["response"] for r in sft) == ["Hello.", "Yes."]  # the desirable examples
    assert not (tmp_path / "out" / "preference.train.jsonl").exists() and stats["pairs"] == 0
    assert set(stats["outputs"]) >= {"kto.train", "kto.dev", "sft.train", "fairseq2/sft.dev", "stats"}


def test_unpaired_parquet_and_nothing_usable(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["A?", "B?", "C?"], "completion": ["a", "b", ""], "label": [True, False, True]})
    pq.write_table(table, tmp_path / "rows.parquet")
    stats = prepare_data(DataConfig(format="unpaired", input=str(tmp_path / "rows.parquet")), tmp_path / "out").stats
    assert stats["rows_kept"] == 2 and stats["dropped"]["empty_response"] == 1
    assert (stats["kto"]["desirable"], stats["kto"]["undesirable"]) == (1, 1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "A?", "completion": "a", "label": 1}])
    with pytest.raises(DataError, match="label"):
        prepare_data(DataConfig(format="unpaired", input=str(bad)), tmp_path / "out2")


# ---------------------------------------------------------------- pair formats -> KTO


def test_every_pair_format_gets_kto_files(tmp_path):
    pairs = [
        {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Red."},  # same chosen again: written once
        {"prompt": "Sea?", "chosen": "Wet.", "rejected": "Dry."},
        {"prompt": "Sea?", "chosen": "Dry.", "rejected": "Wet."},  # both replies already seen, other labels
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    prepared = prepare_data(DataConfig(format="preference", input=str(path), dev_fraction=0.5), tmp_path / "out")
    kto = prepared.stats["kto"]
    assert (kto["desirable"], kto["undesirable"], kto["duplicates_removed"], kto["conflicting_labels"]) == (3, 4, 1, 2)
    written = kto_rows(tmp_path / "out")
    pair_sides = {
        r["prompt_id"]: s for s in ("train", "dev") for r in read_jsonl(tmp_path / "out" / f"preference.{s}.jsonl")
    }
    assert {r["prompt_id"]: s for s, rows in written.items() for r in rows} == pair_sides
    every = written["train"] + written["dev"]
    assert sorted((r["completion"][0]["content"], r["label"]) for r in every) == [
        ("Blue.", True),
        ("Dry.", False),
        ("Dry.", True),
        ("Green.", False),
        ("Red.", False),
        ("Wet.", False),
        ("Wet.", True),
    ]
    assert all(r["id"].endswith((":chosen", ":rejected")) and r["source"] == "pair" for r in every)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["kto"] == kto
    assert prepared.paths["kto.train"] == tmp_path / "out" / "kto.train.jsonl"


def test_records_reader_and_its_errors():
    row = {"id": "a", "prompt": "Hi?", "completion": [{"role": "assistant", "content": "Hey."}], "label": False}
    assert unpaired_messages(row) == ([{"role": "user", "content": "Hi?"}], "Hey.", False)
    with pytest.raises(RecordError, match="'label' must be true"):
        unpaired_messages({**row, "label": "no"})


# ---------------------------------------------------------------- the config


def test_config_takes_the_rule_and_names_bad_fields(tmp_path):
    cfg = config_from_dict({"data": {"oasst_feedback": {"rule": "emoji", "min_net_votes": 2}}})
    assert cfg.data.oasst_feedback == OasstFeedbackRule(rule="emoji", min_net_votes=2)
    assert config_from_dict({"data": {"format": "unpaired", "input": "x.jsonl"}}).data.format == "unpaired"
    for bad, key in (
        ({"desirable_min_quality": 2}, "data.oasst_feedback.desirable_min_quality"),
        ({"rule": "stars"}, "data.oasst_feedback.rule"),
        ({"undesirable_below_quality": 0.9}, "data.oasst_feedback.undesirable_below_quality"),
        ({"min_net_votes": 0}, "data.oasst_feedback.min_net_votes"),
    ):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"data": {"oasst_feedback": bad}})
        assert key in str(info.value)
    with pytest.raises(ConfigError, match="oasst_feedback"):
        config_from_dict({"data": {"format": "preference", "input": "x.jsonl", "oasst_feedback": {"rule": "emoji"}}})
    with pytest.raises(DataError, match="oasst_feedback"):
        prepare_data(
            DataConfig(format="preference", input="x.jsonl", oasst_feedback=OasstFeedbackRule(rule="emoji")), tmp_path
        )
