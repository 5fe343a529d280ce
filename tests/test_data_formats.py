"""data.format preference | hh_rlhf | ultrafeedback: small fixtures in each public schema -> the same files.

Expected prompts and replies are written by hand from the public schemas, never taken from the code under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from steps.config import DataConfig
from steps.data import DataError, pair_messages, prepare_data, sft_messages
from steps.data.pair_formats import hh_turns

SKY = [{"role": "user", "content": "What color is the sky?"}]
BLUE, GREEN = [{"role": "assistant", "content": "It is blue."}], [{"role": "assistant", "content": "It is green."}]

# (row in the public schema, the prompt / chosen / rejected it must become)
TRL_ROWS = {
    "standard": (
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        ([{"role": "user", "content": "The sky is"}], " blue.", " green."),
    ),
    "standard_implicit_prompt": (
        {"chosen": "The sky is blue.", "rejected": "The sky is black."},
        ([{"role": "user", "content": "The sky is"}], " blue.", " black."),
    ),
    "conversational": ({"prompt": SKY, "chosen": BLUE, "rejected": GREEN}, (SKY, "It is blue.", "It is green.")),
    "conversational_implicit_prompt": (
        {"chosen": SKY + BLUE, "rejected": SKY + GREEN},
        (SKY, "It is blue.", "It is green."),
    ),
    "conversational_prompt_string_completions": (
        {"prompt": SKY, "chosen": "Blue.", "rejected": "Green."},
        (SKY, "Blue.", "Green."),
    ),
}
HH_CHOSEN = (
    "\n\nHuman: Hi there?\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\n"
    "Assistant: Why did the chicken cross the road? To get to the other side."
)
HH_REJECTED = "\n\nHuman: Hi there?\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant: No."
HH_PROMPT = [
    {"role": "user", "content": "Hi there?"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]


def ultrafeedback_row(prompt: str, good: str, bad: str, prompt_id: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "prompt_id": prompt_id,
        "chosen": [user, {"role": "assistant", "content": good}],
        "rejected": [user, {"role": "assistant", "content": bad}],
        "messages": [user, {"role": "assistant", "content": good}],
        "score_chosen": 8.5,
        "score_rejected": 3.0,
    }


def write_jsonl(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines), encoding="utf-8"
    )
    return path


def read_rows(out: Path, kind: str) -> list[dict]:
    return [
        json.loads(line)
        for split in ("train", "dev")
        for line in (out / f"{kind}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
    ]


def read_split(out: Path, kind: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{kind}.{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def trl_is_conversational(row: dict) -> bool:
    """TRL's documented test: a supported key holding a list whose first item is a {role, content} dict."""
    return all(
        isinstance(row[k], list) and isinstance(row[k][0], dict) and {"role", "content"} <= set(row[k][0])
        for k in ("prompt", "chosen", "rejected")
    )


def check_trl_conversational(rows: list[dict]) -> None:
    for row in rows:
        assert trl_is_conversational(row), row
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        assert row["prompt"][-1]["role"] == "user"


@pytest.mark.parametrize("layout", sorted(TRL_ROWS))
def test_trl_layouts_map_to_prompt_chosen_rejected(tmp_path, layout):
    row, (prompt, chosen, rejected) = TRL_ROWS[layout]
    prepared = prepare_data(
        DataConfig(format="preference", input=str(write_jsonl(tmp_path / "in.jsonl", [row]))),
        tmp_path / "out",
    )
    pairs = read_rows(tmp_path / "out", "preference")
    assert len(pairs) == 1 and prepared.stats["layouts"] == {layout: 1}
    check_trl_conversational(pairs)
    assert pair_messages(pairs[0]) == (prompt, chosen, rejected)
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": chosen}]
    sft = read_rows(tmp_path / "out", "sft")
    assert [sft_messages(r) for r in sft] == [(prompt, chosen)]
    fairseq2 = read_rows(tmp_path / "out/fairseq2", "preference")
    assert fairseq2[0]["tgt_chosen"] == chosen.strip() and fairseq2[0]["tgt_rejected"] == rejected.strip()


def test_hh_rlhf_transcripts_share_a_prefix(tmp_path):
    assert hh_turns(HH_CHOSEN) == HH_PROMPT + [
        {"role": "assistant", "content": "Why did the chicken cross the road? To get to the other side."}
    ]
    bad = [
        {"chosen": "no turns here", "rejected": HH_REJECTED},  # unparsable_transcript
        {"chosen": HH_CHOSEN, "rejected": "\n\nHuman: Something else?\n\nAssistant: No."},  # prompt_mismatch
        {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},  # identical_responses
        {"chosen": HH_CHOSEN + "\n\nHuman: And?", "rejected": HH_REJECTED},  # last turn is the user's
        {"chosen": HH_CHOSEN},  # missing_field
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, *bad])
    stats = prepare_data(DataConfig(format="hh_rlhf", input=str(path)), tmp_path / "out").stats
    pairs = read_rows(tmp_path / "out", "preference")
    check_trl_conversational(pairs)
    assert [pair_messages(p) for p in pairs] == [
        (HH_PROMPT, "Why did the chicken cross the road? To get to the other side.", "No.")
    ]
    assert {k: v for k, v in stats["dropped"].items() if v} == {
        "unparsable_transcript": 1,
        "prompt_mismatch": 1,
        "identical_responses": 1,
        "last_turn_not_assistant": 1,
        "missing_field": 1,
    }
    assert stats["rows_read"] == 6 == stats["rows_kept"] + sum(stats["dropped"].values())
    assert [e["where"] for e in stats["problem_examples"]] == [f"hh.jsonl line {n}" for n in range(2, 7)]


def test_ultrafeedback_binarized_keeps_scores_and_prompt_id(tmp_path):
    rows = [
        ultrafeedback_row("Name a fruit.", "Apple.", "Car.", "p1"),
        ultrafeedback_row("Name a colour.", "Red.", "Seven.", "p2"),
    ]
    rows.append(dict(rows[0], rejected=[rows[0]["chosen"][0], {"role": "user", "content": "?"}]))  # not assistant
    stats = prepare_data(
        DataConfig(format="ultrafeedback", input=str(write_jsonl(tmp_path / "uf.jsonl", rows))),
        tmp_path / "out",
    ).stats
    pairs = sorted(read_rows(tmp_path / "out", "preference"), key=lambda p: p["prompt_id"])
    check_trl_conversational(pairs)
    assert [(p["prompt_id"], pair_messages(p), p["score_chosen"], p["score_rejected"]) for p in pairs] == [
        ("p1", ([{"role": "user", "content": "Name a fruit."}], "Apple.", "Car."), 8.5, 3.0),
        ("p2", ([{"role": "user", "content": "Name a colour."}], "Red.", "Seven."), 8.5, 3.0),
    ]
    assert stats["dropped"]["last_turn_not_assistant"] == 1 and stats["settings"]["split"] == "train_prefs"


def test_parquet_input_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ultrafeedback_row(f"Question {i}?", f"Answer {i}.", f"Wrong {i}.", f"p{i}") for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    a = prepare_data(DataConfig(format="ultrafeedback", input=str(tmp_path / "uf.parquet")), tmp_path / "a")
    b = prepare_data(
        DataConfig(format="ultrafeedback", input=str(write_jsonl(tmp_path / "uf.jsonl", rows))),
        tmp_path / "b",
    )
    for name in ("preference.train.jsonl", "preference.dev.jsonl", "sft.train.jsonl", "fairseq2/sft.dev.jsonl"):
        assert (a.output_dir / name).read_bytes() == (b.output_dir / name).read_bytes(), name


def test_sft_once_per_distinct_prompt_and_chosen_and_split_by_prompt(tmp_path):
    rows = []
    for i in range(30):
        prompt = f"Tell me about topic {i}."
        for bad in ("Nope.", "No idea.", "Go away."):  # three pairs share prompt and chosen
            rows.append({"prompt": prompt, "chosen": f"Topic {i} is interesting.", "rejected": bad})
    rows.append(dict(rows[0]))  # an exact duplicate pair
    first = prepare_data(
        DataConfig(
            **{
                "format": "preference",
                "input": str(write_jsonl(tmp_path / "a.jsonl", rows)),
                "dev_fraction": 0.2,
                "seed": 5,
            }
        ),
        tmp_path / "a",
    )
    assert first.stats["pairs"] == 90 and first.stats["sft_examples"] == 30
    assert first.stats["dropped"]["duplicate_pair"] == 1
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    second = prepare_data(
        DataConfig(
            **{
                "format": "preference",
                "input": str(write_jsonl(tmp_path / "b.jsonl", shuffled)),
                "dev_fraction": 0.2,
                "seed": 5,
            }
        ),
        tmp_path / "b",
    )
    for out in (tmp_path / "a", tmp_path / "b"):
        dev = {p["prompt"][0]["content"] for p in read_split(out, "preference", "dev")}
        train = {p["prompt"][0]["content"] for p in read_split(out, "preference", "train")}
        assert len(dev) == 6 and len(train) == 24 and not dev & train  # whole prompts on one side, 20 % of 30
    assert sorted((tmp_path / "a/preference.dev.jsonl").read_text().splitlines()) == sorted(
        (tmp_path / "b/preference.dev.jsonl").read_text().splitlines()
    )  # the split ignores row order
    assert second.stats["split_sizes"] == first.stats["split_sizes"]


def test_bad_rows_and_lines_are_counted_with_reasons(tmp_path):
    rows = [
        TRL_ROWS["conversational"][0],
        {"prompt": SKY, "chosen": BLUE},  # missing_field
        {"prompt": SKY, "chosen": BLUE, "rejected": "text"},  # invalid_field (mixed)
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": BLUE, "rejected": GREEN},  # invalid_message
        {"prompt": SKY + BLUE, "chosen": GREEN, "rejected": BLUE},  # prompt_not_ending_with_user
        {"chosen": "Apples.", "rejected": "Pears."},  # no_common_prompt
        {"prompt": SKY, "chosen": BLUE + BLUE, "rejected": GREEN},  # multi_turn_completion
        {"prompt": SKY, "chosen": [{"role": "assistant", "content": "  "}], "rejected": GREEN},  # empty_response
        {"prompt": SKY, "chosen": "Same.", "rejected": " Same. "},  # identical_responses
        {"prompt": SKY, "chosen": "A.", "rejected": "B.", "reference_score_chosen": -3.0},  # incomplete
        {
            "prompt": SKY,
            "chosen": "A.",
            "rejected": "B.",
            "reference_score_chosen": "x",
            "reference_score_rejected": 1,
        },  # invalid_reference_score
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows, ("{not json", "[1, 2]", "7", '{"text": "\\ud800"}'))
    stats = prepare_data(DataConfig(format="preference", input=str(path)), tmp_path / "out").stats
    assert {k: v for k, v in stats["dropped"].items() if v} == {
        "missing_field": 1,
        "invalid_field": 1,
        "invalid_message": 1,
        "prompt_not_ending_with_user": 1,
        "no_common_prompt": 1,
        "multi_turn_completion": 1,
        "empty_response": 1,
        "identical_responses": 1,
        "incomplete_reference_score": 1,
        "invalid_reference_score": 1,
    }
    assert stats["rows_read"] == len(rows) and stats["rows_kept"] == 1
    assert stats["malformed_lines"]["count"] == 4
    assert [e["line"] for e in stats["malformed_lines"]["examples"]] == [12, 13, 14, 15]
    assert "surrogate" in stats["malformed_lines"]["examples"][3]["error"]


def test_errors_name_the_input_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare_data(DataConfig(format="preference", input=str(tmp_path / "missing.jsonl")), tmp_path / "out")
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}] * 3)
    with pytest.raises(DataError, match=r"bad.jsonl: no usable rows .*'missing_field': 3"):
        prepare_data(DataConfig(format="preference", input=str(only_bad)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match=r"data.format 'csv' is unknown"):
        prepare_data(DataConfig(format="csv", input=str(only_bad)), tmp_path / "out")
    with pytest.raises(DataError, match=r"data.langs .* applies to data.format 'oasst' only"):
        prepare_data(DataConfig(format="hh_rlhf", input=str(only_bad), langs=["de"]), tmp_path / "out")
    with pytest.raises(DataError, match="embedded"):
        prepare_data(DataConfig(format="hh_rlhf", input="embedded"), tmp_path / "out")
    array_file = tmp_path / "array.json"
    array_file.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"}]\n', encoding="utf-8")
    with pytest.raises(DataError, match="JSON array"):
        prepare_data(DataConfig(format="preference", input=str(array_file)), tmp_path / "out")


def test_oasst_through_prepare_data_equals_prepare_oasst(tmp_path):
    from steps.data import prepare_oasst
    from steps.data.oasst import OasstOptions

    section = {
        "format": "oasst",
        "input": "embedded",
        "langs": ["en"],
        "pair_strategy": "best_vs_worst",
        "sft_rank": 0,
        "tree_states": ["ready_for_export"],
        "dev_fraction": 0.2,
        "seed": 9,
        "split": None,
    }
    a = prepare_data(DataConfig(**section), tmp_path / "a")
    b = prepare_oasst("embedded", tmp_path / "b", OasstOptions(pair_strategy="best_vs_worst", dev_fraction=0.2, seed=9))
    assert a.stats == b.stats
    for name in a.stats["outputs"].values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_oasst_options_defaults_are_the_data_sections_defaults():
    """prepare_oasst called without options prepares what a default ``data`` section does (no drift between them)."""
    from steps.data.oasst import OasstOptions
    from steps.data.oasst_feedback import OasstFeedbackRule

    options, section = OasstOptions(), DataConfig()
    same = ("pair_strategy", "sft_rank", "include_synthetic", "include_deleted", "require_review", "dev_fraction")
    for name in (*same, "seed", "max_trees"):
        assert getattr(options, name) == getattr(section, name), name
    assert options.langs is not None and list(options.langs) == section.langs == ["en"]
    assert options.tree_states is not None and list(options.tree_states) == section.tree_states
    assert OasstFeedbackRule.of(options.feedback) == section.oasst_feedback == OasstFeedbackRule()
    assert (options.split, section.split) == ("train", None)  # None: the format's training split, train for oasst


def test_trainer_reads_both_pair_layouts_identically(tokenizer):
    from steps.train.batching import tokenize_pairs, tokenize_sft

    conversational = {"id": "a", "prompt": SKY, "chosen": BLUE, "rejected": GREEN}
    strings = {"id": "a", "prompt": SKY, "chosen": "It is blue.", "rejected": "It is green."}
    (x,), _ = tokenize_pairs([conversational], tokenizer, 512)
    (y,), _ = tokenize_pairs([strings], tokenizer, 512)
    assert (x.prompt_ids, x.chosen_ids, x.rejected_ids) == (y.prompt_ids, y.chosen_ids, y.rejected_ids)
    (s,), _ = tokenize_sft([{"id": "s", "prompt": SKY, "completion": BLUE}], tokenizer, 512)
    assert (s.prompt_ids, s.response_ids) == (x.prompt_ids, x.chosen_ids)


def _format_fixture(fmt: str, tmp_path: Path) -> Path:
    topics = ["apples", "rivers", "music", "trains", "gardens", "books", "clouds", "bridges", "maps", "lamps"]
    if fmt == "preference":  # what a TRL user has: prompt / chosen / rejected strings
        rows = [
            {"prompt": f"Describe {t}.", "chosen": f"{t} are wonderful.", "rejected": f"{t} are awful."} for t in topics
        ]
    elif fmt == "hh_rlhf":
        rows = [
            {
                "chosen": f"\n\nHuman: Describe {t}.\n\nAssistant: {t} are wonderful.",
                "rejected": f"\n\nHuman: Describe {t}.\n\nAssistant: {t} are awful.",
            }
            for t in topics
        ]
    else:
        rows = [ultrafeedback_row(f"Describe {t}.", f"{t} are wonderful.", f"{t} are awful.", t) for t in topics]
    return write_jsonl(tmp_path / f"{fmt}.jsonl", rows)


@pytest.mark.parametrize("fmt", ["preference", "hh_rlhf", "ultrafeedback"])
def test_dpo_trains_on_each_format(tmp_path, fmt):
    """The done-when: point ``data`` at the file, run DPO with the real trainer on the tiny model."""
    from steps.config import config_from_dict
    from steps.train.recipes import run_preference

    prepared = prepare_data(
        DataConfig(format=fmt, input=str(_format_fixture(fmt, tmp_path)), dev_fraction=0.2),
        tmp_path / "data",
    )
    assert prepared.stats["pairs"] == 10 and prepared.stats["split_sizes"]["preference"] == {"train": 8, "dev": 2}
    expected = {
        (f"Describe {t}.", f"{t} are wonderful.", f"{t} are awful.")
        for t in ["apples", "rivers", "music", "trains", "gardens", "books", "clouds", "bridges", "maps", "lamps"]
    }
    got = {(p[0][0]["content"], p[1], p[2]) for p in map(pair_messages, read_rows(tmp_path / "data", "preference"))}
    assert got == expected
    cfg = config_from_dict(
        {
            "model": {"base": "tiny"},
            "preference": {"init": "base", "max_steps": 1, "max_seq_len": 128, "max_num_tokens": 2048},
        }
    )
    summary = run_preference(cfg, "dpo", prepared.output_dir, tmp_path / "run")
    assert summary.steps == 1 and summary.final_dev["dev_pairs"] == 2.0
