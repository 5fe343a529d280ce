"""OpenAssistant data preparation: real data in both formats, bad data, the embedded sample, the CLI.

Counts are checked against ``reference_counts`` below: a short, separate implementation that walks the raw rows
directly (it shares no code with steps.data).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from steps.data import PAIR_STRATEGIES, OasstDataError, OasstInputNotFoundError, prepare_oasst
from steps.data.oasst import OasstOptions, main

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS_FILE = "oasst/oasst1_en_validation.part1.messages.jsonl"
TREES_FILE = "oasst/oasst_en100_ready.trees.jsonl"
EMBEDDED = REPO_ROOT / "steps" / "data" / "embedded" / "oasst2_sample.trees.jsonl"
OUTPUT_FILES = [
    f"{prefix}{kind}.{split}.jsonl"
    for prefix in ("", "fairseq2/")
    for kind in ("sft", "preference")
    for split in ("train", "dev")
]


# ---------------------------------------------------------------- independent reference implementation


def load_raw_rows(path: Path) -> list[dict]:
    """Flat message rows from either format (trees flattened; parent and tree_state taken from the nesting)."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if "prompt" not in lines[0]:
        return lines
    rows = []
    for tree in lines:
        stack = [(tree["prompt"], None)]
        while stack:
            node, parent = stack.pop()
            row = {k: v for k, v in node.items() if k != "replies"}
            row.update(parent_id=parent, tree_state=tree["tree_state"], message_tree_id=tree["message_tree_id"])
            rows.append(row)
            stack.extend((reply, node["message_id"]) for reply in node.get("replies", []))
    return rows


def own_drop_reason(row, langs, require_review, include_synthetic):
    if row.get("tree_state") != "ready_for_export":
        return "tree_state"
    if langs and row.get("lang") not in langs:
        return "lang"
    if row.get("deleted"):
        return "deleted"
    if require_review and row.get("review_result") is not True:
        return "review"
    if row.get("synthetic") and not include_synthetic:
        return "synthetic"
    return None


def reference_counts(rows, langs=("en",), require_review=True, include_synthetic=False):
    """Dropped per reason, kept messages, SFT examples (rank 0) and pairs per strategy, straight from raw rows."""
    by_id = {r["message_id"]: r for r in rows}

    def reason(r):
        return own_drop_reason(r, langs, require_review, include_synthetic)

    dropped, kept = Counter(), {}
    for row in rows:
        if reason(row):
            dropped[reason(row)] += 1
            continue
        node, ok = row, True
        while node["parent_id"] is not None:
            node = by_id.get(node["parent_id"])
            if node is None or reason(node):
                ok = False
                break
        if ok:
            kept[row["message_id"]] = row
        else:
            dropped["orphan"] += 1

    def history(row):
        chain = []
        while row["parent_id"] is not None:
            row = by_id[row["parent_id"]]
            chain.append(("user" if row["role"] == "prompter" else "assistant", row["text"]))
        return tuple(reversed(chain))

    sft = {(history(r), r["text"]) for r in kept.values() if r["role"] == "assistant" and r.get("rank") == 0}
    siblings = defaultdict(list)
    for r in kept.values():
        if r["role"] == "assistant" and r.get("rank") is not None:
            siblings[r["parent_id"]].append(r)
    pairs = {s: set() for s in PAIR_STRATEGIES}
    for group in siblings.values():
        prompt = history(group[0])
        worst = max(m["rank"] for m in group)
        for a in group:
            for b in group:
                if a["rank"] >= b["rank"] or a["text"].strip() == b["text"].strip():
                    continue
                key = (prompt, a["text"], b["text"])
                pairs["all_ordered_pairs"].add(key)
                if a["rank"] == 0:
                    pairs["best_vs_rest"].add(key)
                    if b["rank"] == worst:
                        pairs["best_vs_worst"].add(key)
    return {
        "dropped": dropped,
        "kept": len(kept),
        "sft": len(sft),
        "sft_set": sft,
        "pair_sets": pairs,
        "pairs": {s: len(p) for s, p in pairs.items()},
        "trees": len({r["message_tree_id"] for r in rows}),
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_ids(out: Path, split: str) -> set[str]:
    return {row["tree_id"] for kind in ("sft", "preference") for row in read_jsonl(out / f"{kind}.{split}.jsonl")}


# ---------------------------------------------------------------- real data, both formats


@pytest.mark.parametrize("rel_path", [ROWS_FILE, TREES_FILE])
@pytest.mark.parametrize("require_review", [True, False])
def test_counts_match_independent_reference(shared_dir, tmp_path, rel_path, require_review):
    path = shared_dir / rel_path
    expected = reference_counts(load_raw_rows(path), require_review=require_review)
    for strategy in PAIR_STRATEGIES:
        prepared = prepare_oasst(
            str(path), tmp_path / strategy, OasstOptions(pair_strategy=strategy, require_review=require_review)
        )
        stats = prepared.stats
        assert stats["messages_read"] == sum(1 for _ in load_raw_rows(path))
        assert stats["messages_kept"] == expected["kept"]
        assert {k: v for k, v in stats["dropped"].items() if v} == dict(expected["dropped"])
        assert stats["messages_kept"] + sum(stats["dropped"].values()) == stats["messages_read"]
        assert stats["sft_examples"] == expected["sft"]
        assert stats["pairs"] == expected["pairs"]
        assert stats["trees"]["read"] == expected["trees"]
        sizes = stats["split_sizes"]
        written = sum(len(read_jsonl(tmp_path / strategy / f"preference.{s}.jsonl")) for s in ("train", "dev"))
        assert written == expected["pairs"][strategy] == sizes["preference"]["train"] + sizes["preference"]["dev"]
        sft_written = sum(len(read_jsonl(tmp_path / strategy / f"sft.{s}.jsonl")) for s in ("train", "dev"))
        assert sft_written == expected["sft"]
        # not only the counts: the very (history, chosen, rejected) triples and (history, response) pairs
        pairs_written = {
            (
                tuple((m["role"], m["content"]) for m in p["prompt"]),
                p["chosen"][0]["content"],
                p["rejected"][0]["content"],
            )
            for s in ("train", "dev")
            for p in read_jsonl(tmp_path / strategy / f"preference.{s}.jsonl")
        }
        assert pairs_written == expected["pair_sets"][strategy]
        sft_set = {
            (tuple((m["role"], m["content"]) for m in e["prompt"]), e["response"])
            for s in ("train", "dev")
            for e in read_jsonl(tmp_path / strategy / f"sft.{s}.jsonl")
        }
        assert sft_set == expected["sft_set"]


def test_real_data_edge_cases_are_counted(shared_dir, tmp_path):
    """The rows file's known oddities: deleted, review false/null, unranked replies, two orphans, identical texts."""
    rows = load_raw_rows(shared_dir / ROWS_FILE)
    ids = {r["message_id"] for r in rows}
    parentless = [r for r in rows if r["parent_id"] is not None and r["parent_id"] not in ids]
    stats = prepare_oasst(str(shared_dir / ROWS_FILE), tmp_path / "a", OasstOptions(require_review=False)).stats
    assert stats["dropped"]["deleted"] == sum(r["deleted"] for r in rows) == 21
    assert stats["dropped"]["orphan"] == len(parentless) == 2
    stats = prepare_oasst(str(shared_dir / ROWS_FILE), tmp_path / "b").stats
    assert stats["dropped"]["review"] == sum(1 for r in rows if not r["deleted"] and r["review_result"] is not True)
    # rank 0 and rank 2 replies of one prompt have the same text: that pair carries no preference
    assert stats["skipped"]["identical_text_pairs"]["best_vs_rest"] == 1
    trees_stats = prepare_oasst(str(shared_dir / TREES_FILE), tmp_path / "c").stats
    assert trees_stats["format"] == "trees"
    assert trees_stats["dropped"]["synthetic"] == 22
    with_synthetic = prepare_oasst(
        str(shared_dir / TREES_FILE), tmp_path / "d", OasstOptions(include_synthetic=True)
    ).stats
    assert with_synthetic["dropped"]["synthetic"] == 0
    assert with_synthetic["messages_kept"] == 1167


@pytest.mark.parametrize("rel_path", [ROWS_FILE, TREES_FILE])
def test_split_by_tree_and_independent_of_input_order(shared_dir, tmp_path, rel_path):
    path = shared_dir / rel_path
    first = prepare_oasst(str(path), tmp_path / "original")
    lines = path.read_text(encoding="utf-8").splitlines()
    random.Random(7).shuffle(lines)
    shuffled_input = tmp_path / "shuffled.jsonl"
    shuffled_input.write_text("\n".join(lines) + "\n", encoding="utf-8")
    second = prepare_oasst(str(shuffled_input), tmp_path / "shuffled")

    train, dev = tree_ids(tmp_path / "original", "train"), tree_ids(tmp_path / "original", "dev")
    assert train and dev and not train & dev
    usable = first.stats["trees"]["usable"]
    assert len(train) + len(dev) == usable
    assert len(dev) == round(0.1 * usable)
    for name in OUTPUT_FILES:
        assert (tmp_path / "original" / name).read_bytes() == (tmp_path / "shuffled" / name).read_bytes(), name
    assert first.stats["split_sizes"] == second.stats["split_sizes"]


def test_parquet_and_gzip_inputs_match_jsonl(shared_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = load_raw_rows(shared_dir / ROWS_FILE)
    parquet_path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    gz_path = tmp_path / "trees.data"  # no telling suffix: the format comes from the content
    gz_path.write_bytes(gzip.compress((shared_dir / TREES_FILE).read_bytes()))

    for source, reference in ((parquet_path, shared_dir / ROWS_FILE), (gz_path, shared_dir / TREES_FILE)):
        got = prepare_oasst(str(source), tmp_path / f"out-{source.name}")
        want = prepare_oasst(str(reference), tmp_path / f"ref-{source.name}")
        assert got.stats["format"] == want.stats["format"]
        for name in OUTPUT_FILES:
            assert (got.output_dir / name).read_bytes() == (want.output_dir / name).read_bytes(), name


def test_max_trees_and_sft_rank_all(shared_dir, tmp_path):
    path = shared_dir / TREES_FILE
    small = prepare_oasst(str(path), tmp_path / "small", OasstOptions(max_trees=10))
    assert small.stats["trees"]["kept"] == 10
    kept_trees = tree_ids(tmp_path / "small", "train") | tree_ids(tmp_path / "small", "dev")
    assert len(kept_trees) <= 10
    full = prepare_oasst(str(path), tmp_path / "full")
    assert small.stats["dropped"]["max_trees"] == full.stats["messages_kept"] - small.stats["messages_kept"]

    rows = load_raw_rows(path)
    everything = prepare_oasst(str(path), tmp_path / "all", OasstOptions(sft_rank=None)).stats
    kept_ids = {r["message_id"] for r in rows if not r.get("synthetic")}
    # every kept assistant reply (ranked or not) is an SFT example unless it duplicates one
    assistants = [r for r in rows if r["message_id"] in kept_ids and r["role"] == "assistant"]
    assert everything["sft_examples"] + everything["skipped"]["sft_duplicates_removed"] == len(assistants)


# Digests of what the code before the streaming rewrite (commit 2d6d5d8) wrote for these inputs: every output file,
# preference rows turned back into that code's string layout, stats.json with its input path blanked.
ORIGINAL_OUTPUT_DIGESTS = {
    "embedded_default": ("embedded", {}, "8d62c4b806cd24c02f7fba19f55885aa760b255193e1e4495b569cfd7857ca43"),
    "embedded_all": (
        "embedded",
        {"pair_strategy": "all_ordered_pairs", "sft_rank": None, "require_review": False, "include_deleted": True},
        "63dcb8a079eb8679e67a24d722f453dae7735e5a89558a70c83e8631401c23c5",
    ),
    "rows_default": (ROWS_FILE, {}, "5d7fdd9b3f9a2bfdf67cd8bcefc13680c1cebec48301d6c88ddebe500f38dd63"),
    "rows_all_pairs_noreview": (
        ROWS_FILE,
        {"pair_strategy": "all_ordered_pairs", "require_review": False, "sft_rank": None},
        "9d8f364189bcb3fc223b4c2844afc40a62b6790de97eb0d3811b0da9a274b1e1",
    ),
    "trees_default": (TREES_FILE, {}, "4fd083bfdc0c0de95b1bad754a590750d259332078a10218d3356cf545962651"),
    "trees_synth_max": (
        TREES_FILE,
        {"include_synthetic": True, "max_trees": 40, "seed": 7, "dev_fraction": 0.25},
        "f4ce2845dff4b4285c9d2bcd57d82bb60c7b1ea2fdbb98fcdb3eea402e243b8f",
    ),
}


def output_digest(out: Path) -> str:
    def legacy(data: bytes) -> bytes:
        rows = [json.loads(line) for line in data.split(b"\n") if line]
        for row in rows:
            for key in ("chosen", "rejected"):
                row[key] = row[key][0]["content"] if isinstance(row[key], list) else row[key]
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()

    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel, data = path.relative_to(out).as_posix(), path.read_bytes()
        if rel.startswith("kto."):  # added later (KTO examples, tests/test_kto_data.py): the rest is unchanged
            continue
        if rel == "stats.json":
            stats = json.loads(data)
            stats["input"] = "INPUT"
            stats.pop("kto")
            stats["outputs"] = {k: v for k, v in stats["outputs"].items() if not k.startswith("kto.")}
            data = (json.dumps(stats, indent=2, ensure_ascii=False) + "\n").encode()
        if rel.startswith("preference."):
            data = legacy(data)
        digest.update(rel.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


@pytest.mark.parametrize("case", sorted(ORIGINAL_OUTPUT_DIGESTS))
def test_outputs_match_the_code_before_streaming(request, tmp_path, case):
    source, settings, expected = ORIGINAL_OUTPUT_DIGESTS[case]
    if source != "embedded":
        source = str(request.getfixturevalue("shared_dir") / source)
    prepare_oasst(source, tmp_path / "out", OasstOptions(**settings))
    assert output_digest(tmp_path / "out") == expected


# ---------------------------------------------------------------- hand-written edge cases


def message(text, role, parent=None, rank=None, *, message_id=None, **overrides):
    """One flat row with all 18 columns."""
    row = {
        "message_id": message_id or str(uuid.uuid4()),
        "parent_id": parent["message_id"] if isinstance(parent, dict) else parent,
        "user_id": "u",
        "created_date": "2023-05-01T00:00:00+00:00",
        "text": text,
        "role": role,
        "lang": "en",
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "detoxify": None,
        "message_tree_id": None,
        "tree_state": "ready_for_export",
        "emojis": None,
        "labels": None,
    }
    row.update(overrides)
    return row


def conversation(topic: str) -> list[dict]:
    """A clean tree: prompt, two ranked replies, a follow-up under the best one with two ranked replies."""
    root = message(f"Question about {topic}?", "prompter")
    best = message(f"Good answer on {topic}.", "assistant", root, 0)
    worse = message(f"Bad answer on {topic}.", "assistant", root, 1)
    follow = message(f"Follow-up on {topic}?", "prompter", best)
    rows = [
        root,
        best,
        worse,
        follow,
        message(f"Good follow-up answer on {topic}.", "assistant", follow, 0),
        message(f"Bad follow-up answer on {topic}.", "assistant", follow, 1),
    ]
    for row in rows:
        row["message_tree_id"] = root["message_id"]
    return rows


def write_rows(path: Path, rows: list, extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for position, text in sorted((extra_lines or {}).items()):
        lines.insert(position - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_multi_turn_prompt_and_llama3_rendering(tmp_path):
    rows = conversation("tea") + conversation("coffee")
    out = tmp_path / "out"
    prepared = prepare_oasst(str(write_rows(tmp_path / "in.jsonl", rows)), out, OasstOptions(dev_fraction=0.5))
    assert prepared.stats["sft_examples"] == 4 and prepared.stats["pairs"]["best_vs_rest"] == 4
    sft = read_jsonl(out / "sft.train.jsonl") + read_jsonl(out / "sft.dev.jsonl")
    multi = next(e for e in sft if e["response"] == "Good follow-up answer on tea.")
    assert multi["prompt"] == [
        {"role": "user", "content": "Question about tea?"},
        {"role": "assistant", "content": "Good answer on tea."},
        {"role": "user", "content": "Follow-up on tea?"},
    ]
    fairseq2 = read_jsonl(out / "fairseq2/sft.train.jsonl") + read_jsonl(out / "fairseq2/sft.dev.jsonl")
    row = next(r for r in fairseq2 if r["id"] == multi["id"])
    assert row == {
        "id": multi["id"],
        "src": "<|start_header_id|>user<|end_header_id|>\n\nQuestion about tea?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nGood answer on tea.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nFollow-up on tea?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "tgt": "Good follow-up answer on tea.",
    }
    pairs = read_jsonl(out / "fairseq2/preference.train.jsonl") + read_jsonl(out / "fairseq2/preference.dev.jsonl")
    assert {p["tgt_chosen"] for p in pairs} == {
        "Good answer on tea.",
        "Good follow-up answer on tea.",
        "Good answer on coffee.",
        "Good follow-up answer on coffee.",
    }
    assert set(pairs[0]) == {"id", "src", "tgt_chosen", "tgt_rejected"}
    chat_pairs = read_jsonl(out / "preference.train.jsonl")
    assert set(chat_pairs[0]) == {"id", "tree_id", "prompt", "chosen", "rejected", "chosen_rank", "rejected_rank"}
    # TRL's conversational preference layout: prompt messages, one assistant message per side
    by_chosen = {p["chosen"][0]["content"]: p for p in chat_pairs + read_jsonl(out / "preference.dev.jsonl")}
    follow_up = by_chosen["Good follow-up answer on tea."]
    assert follow_up["chosen"] == [{"role": "assistant", "content": "Good follow-up answer on tea."}]
    assert follow_up["rejected"] == [{"role": "assistant", "content": "Bad follow-up answer on tea."}]
    assert follow_up["prompt"] == multi["prompt"]
    assert (chat_pairs[0]["chosen_rank"], chat_pairs[0]["rejected_rank"]) == (0, 1)
    assert tree_ids(out, "train") and tree_ids(out, "dev")


def test_malformed_lines_are_counted_with_line_numbers(tmp_path):
    path = write_rows(tmp_path / "in.jsonl", conversation("tea"), {3: "{not json", 5: "[1, 2]", 6: ""})
    stats = prepare_oasst(str(path), tmp_path / "out").stats
    assert stats["malformed_lines"]["count"] == 2
    assert [e["line"] for e in stats["malformed_lines"]["examples"]] == [3, 5]
    assert stats["sft_examples"] == 2 and stats["messages_kept"] == 6


def test_duplicate_ids_keep_the_first(tmp_path):
    rows = conversation("tea")
    duplicate = dict(rows[1], text="A second row reusing the best answer's id.")
    stats = prepare_oasst(str(write_rows(tmp_path / "in.jsonl", rows + [duplicate])), tmp_path / "out").stats
    assert stats["dropped"]["duplicate_id"] == 1
    assert stats["messages_kept"] == 6
    assert stats["problem_examples"][0]["reason"] == "duplicate_id"
    assert stats["problem_examples"][0]["where"] == "line 7"


def test_parent_cycles_are_dropped_with_their_replies(tmp_path):
    a = message("Looping prompt?", "prompter", message_id="a", parent="b")
    b = message("Looping answer.", "assistant", message_id="b", parent="a", rank=0)
    child = message("Reply inside the loop.", "prompter", parent="a")
    self_loop = message("I am my own parent.", "prompter", message_id="s", parent="s")
    path = write_rows(tmp_path / "in.jsonl", conversation("tea") + [a, b, child, self_loop])
    stats = prepare_oasst(str(path), tmp_path / "out").stats
    assert stats["dropped"]["cycle"] == 3
    assert stats["dropped"]["orphan"] == 1
    assert stats["messages_kept"] == 6


def test_missing_keys_and_invalid_fields(tmp_path):
    rows = conversation("tea")
    no_text = {k: v for k, v in message("x", "prompter").items() if k != "text"}
    reply_to_no_text = message("Answer to a message without text.", "assistant", no_text, 0)
    no_parent_key = {k: v for k, v in message("y", "assistant", rank=0).items() if k != "parent_id"}
    bad_rank = message("Ranked oddly.", "assistant", rows[0], rank="first")
    path = write_rows(tmp_path / "in.jsonl", rows + [no_text, reply_to_no_text, no_parent_key, bad_rank])
    stats = prepare_oasst(str(path), tmp_path / "out").stats
    assert stats["dropped"]["missing_key"] == 2
    assert stats["dropped"]["invalid_field"] == 1
    assert stats["dropped"]["orphan"] == 1
    details = {e["where"]: e["detail"] for e in stats["problem_examples"]}
    assert details["line 7"] == "missing text" and details["line 9"] == "missing parent_id"
    assert "rank" in details["line 10"]

    tree = {
        "message_tree_id": "t",
        "tree_state": "ready_for_export",
        "prompt": {
            "message_id": "t",
            "role": "prompter",
            "text": "Hi?",
            "lang": "en",
            "review_result": True,
            "replies": [
                {
                    "message_id": "r0",
                    "role": "assistant",
                    "lang": "en",
                    "review_result": True,
                    "rank": 0,
                    "replies": [
                        {"message_id": "q", "role": "prompter", "text": "And?", "lang": "en", "review_result": True}
                    ],
                },
                {
                    "message_id": "r1",
                    "role": "assistant",
                    "text": "Hello.",
                    "lang": "en",
                    "review_result": True,
                    "rank": 1,
                },
                {
                    "message_id": "r2",
                    "role": "assistant",
                    "text": "Go away.",
                    "lang": "en",
                    "review_result": True,
                    "rank": 2,
                },
            ],
        },
    }
    trees_path = tmp_path / "trees.jsonl"
    trees_path.write_text(json.dumps(tree) + "\n" + json.dumps({"message_tree_id": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(OasstDataError, match="0 SFT examples"):  # rank 0 lost: nothing for SFT / best_vs_rest
        prepare_oasst(str(trees_path), tmp_path / "out-trees")
    stats = prepare_oasst(
        str(trees_path), tmp_path / "out-trees", OasstOptions(pair_strategy="all_ordered_pairs")
    ).stats
    assert stats["dropped"]["missing_key"] == 1 and stats["dropped"]["orphan"] == 1
    assert stats["problem_examples"] == [
        {"reason": "missing_key", "where": "line 1", "message_id": "r0", "detail": "missing text"}
    ]
    assert stats["malformed_lines"]["examples"] == [{"line": 2, "error": "tree line without a 'prompt' object"}]
    assert stats["sft_examples"] == 0 and stats["pairs"] == {
        "best_vs_rest": 0,
        "best_vs_worst": 0,
        "all_ordered_pairs": 1,
    }
    assert stats["ranks"]["ranked_groups_without_rank0"] == 1 and stats["trees"]["kept"] == 1


def test_ranks_with_gaps_ties_and_unranked(tmp_path):
    root = message("Which is best?", "prompter")
    replies = [
        message(f"Reply {name}.", "assistant", root, rank) for name, rank in (("a", 0), ("b", 2), ("c", 2), ("d", None))
    ]
    no_best = message("No winner here?", "prompter")
    no_best_replies = [message(f"Other {n}.", "assistant", no_best, r) for n, r in (("x", 1), ("y", 3))]
    rows = [root, *replies, no_best, *no_best_replies]
    stats = prepare_oasst(
        str(write_rows(tmp_path / "in.jsonl", rows)), tmp_path / "out", OasstOptions(pair_strategy="all_ordered_pairs")
    ).stats
    # a(0) beats b(2) and c(2); b and c are tied (no pair); d is unranked (never paired); x(1) beats y(3)
    assert stats["pairs"] == {"best_vs_rest": 2, "best_vs_worst": 2, "all_ordered_pairs": 3}
    assert stats["ranks"]["ranked_groups"] == 2
    assert stats["ranks"]["ranked_groups_with_ties"] == 1
    assert stats["ranks"]["ranked_groups_with_gaps"] == 2
    assert stats["ranks"]["ranked_groups_without_rank0"] == 1
    assert stats["ranks"]["unranked_replies"] == 1 == stats["ranks"]["unranked_beside_ranked"]
    assert stats["sft_examples"] == 1
    written = read_jsonl(tmp_path / "out/preference.train.jsonl") + read_jsonl(tmp_path / "out/preference.dev.jsonl")
    assert sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in written) == [
        ("Other x.", "Other y."),
        ("Reply a.", "Reply b."),
        ("Reply a.", "Reply c."),
    ]


def test_no_usable_conversation_names_file_and_filters(tmp_path):
    rows = [dict(r, lang="de") for r in conversation("Tee")]
    path = write_rows(tmp_path / "german.jsonl", rows)
    with pytest.raises(OasstDataError) as error:
        prepare_oasst(str(path), tmp_path / "out")
    assert str(path) in str(error.value) and "'lang': 6" in str(error.value) and "langs" in str(error.value)
    assert not (tmp_path / "out").exists()
    assert prepare_oasst(str(path), tmp_path / "out", OasstOptions(langs=["de"])).stats["sft_examples"] == 2
    assert prepare_oasst(str(path), tmp_path / "out2", OasstOptions(langs=None)).stats["languages_seen"] == {"de": 6}


def test_bad_arguments_and_missing_inputs(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(OasstInputNotFoundError, match=r"nope\.jsonl: no such file"):
        prepare_oasst(str(missing), tmp_path / "out")
    assert issubclass(OasstInputNotFoundError, ValueError) and issubclass(OasstInputNotFoundError, FileNotFoundError)
    with pytest.raises(OasstDataError, match="is a directory"):
        prepare_oasst(str(tmp_path), tmp_path / "out")
    with pytest.raises(OasstDataError, match="pair_strategy"):
        prepare_oasst("embedded", tmp_path / "out", OasstOptions(pair_strategy="random"))
    with pytest.raises(OasstDataError, match="sft_rank"):
        prepare_oasst("embedded", tmp_path / "out", OasstOptions(sft_rank=-1))
    with pytest.raises(OasstDataError, match="dev_fraction"):
        prepare_oasst("embedded", tmp_path / "out", OasstOptions(dev_fraction=1.0))
    array_file = tmp_path / "array.json"
    array_file.write_text("[\n" + json.dumps(conversation("tea")[0]) + "\n]\n", encoding="utf-8")
    with pytest.raises(OasstDataError, match="JSON array"):
        prepare_oasst(str(array_file), tmp_path / "out")


def test_outputs_are_written_atomically_and_overwrite_cleanly(tmp_path):
    path = write_rows(tmp_path / "in.jsonl", conversation("tea") + conversation("milk"))
    out = tmp_path / "out"
    first = prepare_oasst(str(path), out)
    second = prepare_oasst(str(path), out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    kto_files = ["kto.train.jsonl", "kto.dev.jsonl"]
    assert files == sorted(OUTPUT_FILES + kto_files + ["stats.json"])
    assert set(second.paths) == {name.removesuffix(".jsonl") for name in OUTPUT_FILES + kto_files} | {"stats"}
    assert json.loads((out / "stats.json").read_text()) == first.stats == second.stats


# ---------------------------------------------------------------- embedded sample and CLI


def test_embedded_sample(tmp_path):
    assert EMBEDDED.stat().st_size < 200_000
    raw_lines = EMBEDDED.read_text(encoding="utf-8").splitlines()
    export_keys = {
        "message_id",
        "parent_id",
        "user_id",
        "created_date",
        "text",
        "role",
        "lang",
        "review_count",
        "review_result",
        "deleted",
        "rank",
        "synthetic",
        "model_name",
        "detoxify",
        "emojis",
        "labels",
        "replies",
    }
    rows = load_raw_rows(EMBEDDED)
    assert len(raw_lines) >= 30 and len({r["message_id"] for r in rows}) == len(rows)
    for line in raw_lines:
        tree = json.loads(line)
        assert set(tree) == {"message_tree_id", "tree_state", "prompt"}
        assert tree["tree_state"] == "ready_for_export" and tree["prompt"]["message_id"] == tree["message_tree_id"]
        stack = [tree["prompt"]]
        while stack:
            node = stack.pop()
            assert set(node) == export_keys, node["message_id"]
            uuid.UUID(node["message_id"])
            ranks = sorted(r["rank"] for r in node["replies"] if r["rank"] is not None)
            if node["role"] == "prompter":
                assert 2 <= len(ranks) <= 4 and ranks == list(range(len(ranks)))
            stack.extend(node["replies"])
    assert {r["lang"] for r in rows} == {"en"}

    stats = prepare_oasst("embedded", tmp_path / "out").stats
    expected = reference_counts(rows)
    assert {k: v for k, v in stats["dropped"].items() if v} == {"deleted": 1, "review": 1} == dict(expected["dropped"])
    assert stats["malformed_lines"]["count"] == 0
    assert stats["sft_examples"] == expected["sft"] >= 30
    assert stats["pairs"] == expected["pairs"] and stats["pairs"]["best_vs_rest"] >= 30
    assert stats["ranks"]["unranked_replies"] >= 2
    sft = read_jsonl(tmp_path / "out/sft.train.jsonl") + read_jsonl(tmp_path / "out/sft.dev.jsonl")
    assert sum(len(e["prompt"]) == 3 for e in sft) >= 5  # multi-turn examples


def test_cli_smoke(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", USERNAME="prefflow", PYTHONWARNINGS="error::RuntimeWarning")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.data.oasst",
            "--input",
            "embedded",
            "--output-dir",
            str(tmp_path / "cli"),
            "--pairs",
            "best_vs_worst",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = reference_counts(load_raw_rows(EMBEDDED))
    assert f"sft examples: {expected['sft']}" in done.stdout
    assert f"best_vs_worst={expected['pairs']['best_vs_worst']}" in done.stdout
    assert "RuntimeWarning" not in done.stderr
    written = read_jsonl(tmp_path / "cli/preference.train.jsonl") + read_jsonl(tmp_path / "cli/preference.dev.jsonl")
    assert len(written) == expected["pairs"]["best_vs_worst"]

    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.data.oasst",
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--output-dir",
            str(tmp_path / "x"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2 and "missing.jsonl: no such file" in failed.stderr


def test_cli_language_options_in_process(tmp_path, capsys):
    assert (
        main(
            [
                "--input",
                "embedded",
                "--output-dir",
                str(tmp_path / "a"),
                "--lang",
                "de,fr",
                "--lang",
                "en",
                "--sft-rank",
                "all",
                "--tree-state",
                "all",
            ]
        )
        == 0
    )
    stats = json.loads((tmp_path / "a/stats.json").read_text())
    assert stats["settings"]["langs"] == ["de", "fr", "en"] and stats["settings"]["tree_states"] == "all"
    assert stats["settings"]["sft_rank"] is None
    assert main(["--input", "embedded", "--output-dir", str(tmp_path / "b"), "--lang", "de"]) == 2
    assert "no usable conversation" in capsys.readouterr().err


def test_hub_rows_path(shared_dir, tmp_path):
    """The Hub branch: a real ``datasets.Dataset`` of the rows reads like the JSONL; offline, a clear error."""
    import datasets

    from steps.data.oasst_read import looks_like_hub_id, read_dataset_rows, read_local_file

    rows = load_raw_rows(shared_dir / ROWS_FILE)
    with (
        read_dataset_rows(datasets.Dataset.from_list(rows), "local-dataset") as from_dataset,
        read_local_file(shared_dir / ROWS_FILE) as from_file,
    ):

        def columns(index):
            return [
                (index.ids[i], index.parent[i], index.rank[i], index.flags[i], index.text_of(i))
                for i in range(len(index))
            ]

        assert columns(from_dataset) == columns(from_file)
        assert [from_file.text_of(i) for i in range(len(from_file))] == [r["text"] for r in rows]
        assert from_dataset.trees_read == 95

    assert looks_like_hub_id("OpenAssistant/oasst2") and not looks_like_hub_id("data/oasst2.jsonl")
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("would download OpenAssistant/oasst2; the offline error is checked with HF_HUB_OFFLINE=1")
    with pytest.raises(OasstDataError, match="OpenAssistant/oasst2: cannot load Hub dataset split 'train'"):
        prepare_oasst("OpenAssistant/oasst2", tmp_path / "out")
