"""data.format fairseq2: generic_preference / generic_instruction JSONL from a file, a directory or a MANIFEST.

``src`` strings are written by hand; the reference-score test counts reference forwards of the real trainer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from steps.config import DataConfig
from steps.data import DataError, pair_messages, prepare_data, prepare_oasst, sft_messages
from steps.data.fairseq2_format import SrcFormatError, parse_src, render_llama3_prompt

H = "<|start_header_id|>{}<|end_header_id|>\n\n"
TOPICS = ["apples", "rivers", "music", "trains", "gardens", "books", "clouds", "bridges", "maps", "lamps"]


def src(*turns: tuple[str, str]) -> str:
    return "".join(H.format(role) + text + "<|eot_id|>" for role, text in turns) + H.format("assistant")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(out: Path, kind: str) -> list[dict]:
    return [
        json.loads(line)
        for split in ("train", "dev")
        for line in (out / f"{kind}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
    ]


@pytest.mark.parametrize(
    ("text", "messages", "layout"),
    [
        (src(("user", "Hi?")), [{"role": "user", "content": "Hi?"}], "llama3"),
        (
            "<|begin_of_text|>"
            + src(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."), ("user", "Bye?")),
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye?"},
            ],
            "llama3",
        ),
        ("Question: why?\nAnswer:", [{"role": "user", "content": "Question: why?\nAnswer:"}], "plain"),
    ],
)
def test_src_maps_back_to_messages(text, messages, layout):
    assert parse_src(text) == (messages, layout)


@pytest.mark.parametrize(
    "text",
    [
        src(("user", "Hi?")) + "Sure, ",  # a pre-filled reply after the assistant header
        H.format("user") + "Hi?",  # no end of turn, no assistant header
        src(("robot", "Hi?")),  # a role the chat templates do not have
        H.format("assistant"),  # no prompt turns
    ],
)
def test_src_with_broken_llama3_structure_is_rejected(text):
    with pytest.raises(SrcFormatError):
        parse_src(text)


def test_render_then_parse_is_the_identity_on_stripped_turns():
    messages = [
        {"role": "user", "content": "  Tell me\n\nabout tea.  "},
        {"role": "assistant", "content": "Tea."},
        {"role": "user", "content": "More?"},
    ]
    stripped = [dict(m, content=m["content"].strip()) for m in messages]
    assert parse_src(render_llama3_prompt(messages)) == (stripped, "llama3")


def test_directory_manifest_and_glob(tmp_path):
    pairs = [
        {"id": f"p{i}", "src": src(("user", f"Q{i}?")), "tgt_chosen": f"Good {i}.", "tgt_rejected": f"Bad {i}."}
        for i in range(6)
    ]
    write_jsonl(tmp_path / "d/part-a.jsonl", pairs[:3])
    write_jsonl(tmp_path / "d/nested/part-b.jsonl", pairs[3:])
    write_jsonl(
        tmp_path / "d/instructions.jsonl",
        [{"src": src(("user", "Say hi.")), "tgt": "Hi!"}, {"src": "Plain prompt", "tgt": "Plain answer"}],
    )
    (tmp_path / "d/notes.txt").write_text("not data", encoding="utf-8")
    globbed = prepare_data(DataConfig(format="fairseq2", input=str(tmp_path / "d")), tmp_path / "out")
    assert globbed.stats["pairs"] == 6 and globbed.stats["sft_examples"] == 2
    assert globbed.stats["sft_source"].startswith("instruction rows")
    assert {p["id"] for p in read_rows(tmp_path / "out", "preference")} == {f"p{i}" for i in range(6)}
    assert sorted((sft_messages(r) for r in read_rows(tmp_path / "out", "sft")), key=json.dumps) == [
        ([{"role": "user", "content": "Plain prompt"}], "Plain answer"),
        ([{"role": "user", "content": "Say hi."}], "Hi!"),
    ]

    (tmp_path / "d/MANIFEST").write_text("part-a.jsonl\t3\nnested/part-b.jsonl\t1.5\n", encoding="utf-8")
    listed = prepare_data(DataConfig(format="fairseq2", input=str(tmp_path / "d")), tmp_path / "out2")
    # fairseq2 sorts the MANIFEST lines before reading them
    assert [Path(f).name for f in listed.stats["source"]["files"]] == ["part-b.jsonl", "part-a.jsonl"]
    assert listed.stats["source"]["weights"] == [1.5, 3.0]
    assert listed.stats["pairs"] == 6 and listed.stats["sft_examples"] == 6  # no instruction file listed: derived
    (tmp_path / "d/MANIFEST").write_text("part-a.jsonl 3\n", encoding="utf-8")
    with pytest.raises(DataError, match="path<TAB>weight"):
        prepare_data(DataConfig(format="fairseq2", input=str(tmp_path / "d")), tmp_path / "out3")


def test_bad_rows_are_counted(tmp_path):
    rows = [
        {"src": src(("user", "Fine?")), "tgt_chosen": "Yes.", "tgt_rejected": "No."},
        {"src": src(("user", "Q?")) + "prefill", "tgt_chosen": "A.", "tgt_rejected": "B."},  # unparsable_src
        {"src": src(("user", "Q?")), "tgt_chosen": "A."},  # missing_field
        {
            "src": src(("user", "Q?")),
            "tgt_chosen": "A.",
            "tgt_rejected": "B.",
            "reference_score_chosen": float("nan"),
            "reference_score_rejected": -1.0,
        },  # invalid_reference_score
        {"src": src(("user", "Q?")), "tgt_chosen": "A.", "tgt_rejected": "B.", "reference_score_rejected": -1.0},
        {"id": 7, "src": src(("user", "Q?")), "tgt": ""},  # empty_response
        {"src": 3, "tgt": "x"},  # invalid_field
    ]
    stats = prepare_data(
        DataConfig(format="fairseq2", input=str(write_jsonl(tmp_path / "in.jsonl", rows))), tmp_path / "out"
    ).stats
    assert {k: v for k, v in stats["dropped"].items() if v} == {
        "unparsable_src": 1,
        "missing_field": 1,
        "invalid_reference_score": 1,
        "incomplete_reference_score": 1,
        "empty_response": 1,
        "invalid_field": 1,
    }
    assert stats["rows_read"] == 7 == stats["rows_kept"] + sum(stats["dropped"].values())


def test_round_trip_of_the_fairseq2_files_prefflow_writes(tmp_path):
    prepared = prepare_oasst("embedded", tmp_path / "oasst")
    written = {
        (json.dumps([dict(m, content=m["content"].strip()) for m in p]), c.strip(), r.strip())
        for p, c, r in map(pair_messages, read_rows(tmp_path / "oasst", "preference"))
    }
    back = prepare_data(DataConfig(format="fairseq2", input=str(tmp_path / "oasst/fairseq2")), tmp_path / "back")
    read_back = {(json.dumps(p), c, r) for p, c, r in map(pair_messages, read_rows(tmp_path / "back", "preference"))}
    assert read_back == written and len(written) == prepared.stats["pairs"]["best_vs_rest"]
    assert back.stats["sft_examples"] == prepared.stats["sft_examples"]
    ids = {p["id"] for p in read_rows(tmp_path / "oasst", "preference")}
    assert {p["id"] for p in read_rows(tmp_path / "back", "preference")} == ids


class ReferenceForwards:
    """Counts forward passes of model modules (decoder body or full causal LM, any ``PreTrainedModel``) made inside
    ``steps.train.reference.score_pending``, the trainer's reference path (called only when scores are missing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import steps.train.reference as reference

        self.forwards, self.calls, self._inside = 0, 0, False
        real = reference.score_pending

        def counted(*args, **kwargs):
            self.calls += 1
            self._inside = True
            try:
                return real(*args, **kwargs)
            finally:
                self._inside = False

        monkeypatch.setattr(reference, "score_pending", counted)
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        from transformers import PreTrainedModel

        if self._inside and isinstance(module, PreTrainedModel):
            self.forwards += 1

    def close(self) -> None:
        self._handle.remove()


def _train(tmp_path: Path, name: str, rows: list[dict], monkeypatch: pytest.MonkeyPatch):
    from steps.config import config_from_dict
    from steps.train.recipes import run_preference

    write_jsonl(tmp_path / name / "input/part.jsonl", rows)
    prepared = prepare_data(
        DataConfig(format="fairseq2", input=str(tmp_path / name / "input"), dev_fraction=0.2),
        tmp_path / name / "data",
    )
    cfg = config_from_dict(
        {
            "model": {"base": "tiny"},
            "preference": {
                "init": "base",
                "max_steps": 1,
                "max_seq_len": 128,
                "max_num_tokens": 4096,
                "dev_every_epoch": False,
            },
        }
    )
    counter = ReferenceForwards(monkeypatch)
    try:
        summary = run_preference(cfg, "dpo", prepared.output_dir, tmp_path / name / "run")
    finally:
        counter.close()
    return prepared, summary, counter


def test_reference_scores_in_the_data_replace_the_reference_forwards(tmp_path, monkeypatch):
    rows = [
        {
            "id": f"p{i}",
            "src": src(("user", f"Describe {t}.")),
            "tgt_chosen": f"{t} are wonderful.",
            "tgt_rejected": f"{t} are awful.",
        }
        for i, t in enumerate(TOPICS)
    ]
    # control: no scores, so the trainer computes them (and caches them by pair id)
    _, control, counted = _train(tmp_path, "control", rows, monkeypatch)
    assert counted.calls == 1 and counted.forwards >= 1
    computed = json.loads((tmp_path / "control/run/reference_logps.json").read_text())["scores"]
    assert set(computed) == {r["id"] for r in rows}

    # the same pairs with reference scores that make every chosen reply 5 nats less likely under the reference
    offset = 5.0
    scored_rows = [
        dict(r, reference_score_chosen=computed[r["id"]][0] - offset, reference_score_rejected=computed[r["id"]][1])
        for r in rows
    ]
    prepared, scored, counted = _train(tmp_path, "scored", scored_rows, monkeypatch)
    assert prepared.stats["reference_scores"] == {"pairs_with": 10, "pairs_without": 0}
    pair_rows = read_rows(prepared.output_dir, "preference")
    assert {p["id"]: (p["reference_score_chosen"], p["reference_score_rejected"]) for p in pair_rows} == {
        r["id"]: (r["reference_score_chosen"], r["reference_score_rejected"]) for r in scored_rows
    }
    assert counted.forwards == 0 and not (tmp_path / "scored/run/reference_logps.json").exists()
    # DPO's first-step loss, before any update: z = beta * offset for every pair, loss = -log sigmoid(z)
    beta = 0.1
    assert scored.history[0]["loss"] == pytest.approx(math.log1p(math.exp(-beta * offset)), abs=2e-3)
    assert control.history[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)
