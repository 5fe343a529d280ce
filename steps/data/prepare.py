"""The one entry point the flow calls: ``prepare_data(data_section, out_dir)`` for every ``data.format``.

CLI: ``python -m steps.data --format hh_rlhf --input FILE --output-dir DIR`` (``--help`` for the rest).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steps.data.oasst import PreparedData, format_summary, prepare_oasst
from steps.data.oasst_feedback import OasstFeedbackRule
from steps.data.pair_prep import PAIR_FORMATS, prepare_pairs
from steps.data.records import DataError
from steps.data.unpaired_prep import kto_from_pair_files, prepare_unpaired, with_kto

logger = logging.getLogger(__name__)

FORMATS = ("oasst", *PAIR_FORMATS, "unpaired")
OASST_ONLY = {
    "langs": ["en"],
    "pair_strategy": "best_vs_rest",
    "sft_rank": 0,
    "tree_states": ["ready_for_export"],
    "include_synthetic": False,
    "include_deleted": False,
    "require_review": True,
    "max_trees": None,
    "oasst_feedback": OasstFeedbackRule(),
}
"""Fields that only OpenAssistant trees have, with their defaults (a non-default value with another format is an
error: it would be silently ignored otherwise)."""


def _get(section: Any, name: str, default: Any) -> Any:
    if isinstance(section, Mapping):
        return section.get(name, default)
    return getattr(section, name, default)


def _as_tuple(values: Any) -> tuple[str, ...] | None:
    if values is None or isinstance(values, str):
        return values if values is None else (values,)
    return tuple(values) or None


def _comparable(name: str, value: Any) -> Any:
    """A data-section value in the form of its OASST_ONLY default (lists for tuples, the rule for a mapping)."""
    if name == "oasst_feedback":
        return OasstFeedbackRule.of(value)
    return list(value) if isinstance(value, (list, tuple)) else value


def prepare_data(section: Any, out_dir: str | Path) -> PreparedData:
    """Prepare ``section`` (the config's ``data`` section: a dataclass, any object with those attributes, or a
    dict) into ``out_dir``: ``sft.{train,dev}.jsonl``, ``preference.{train,dev}.jsonl`` (TRL conversational),
    ``kto.{train,dev}.jsonl`` (TRL unpaired: always, see ``unpaired_prep``), ``fairseq2/...`` and ``stats.json``.

    Fields: ``format`` (``oasst`` default, ``preference``, ``hh_rlhf``, ``ultrafeedback``, ``fairseq2``,
    ``unpaired``), ``input``, ``split`` (``None``: the format's training split), ``dev_fraction``, ``seed``, and for
    ``oasst`` only ``langs``, ``pair_strategy``, ``sft_rank``, ``tree_states``, ``include_synthetic``,
    ``include_deleted``, ``require_review``, ``max_trees``, ``oasst_feedback`` (how replies become KTO examples).
    Raises ``DataError`` naming the field for an unknown format or an oasst-only field set with another format.
    """
    fmt = _get(section, "format", "oasst")
    if fmt not in FORMATS:
        raise DataError(f"data.format {fmt!r} is unknown; choose one of {FORMATS}")
    source = _get(section, "input", "embedded")
    split = _get(section, "split", None)
    dev_fraction = float(_get(section, "dev_fraction", 0.1))
    seed = int(_get(section, "seed", 333))
    if fmt == "oasst":
        langs, tree_states = _get(section, "langs", ["en"]), _get(section, "tree_states", ["ready_for_export"])
        return prepare_oasst(
            source,
            out_dir,
            langs=_as_tuple(langs),
            pair_strategy=_get(section, "pair_strategy", "best_vs_rest"),
            sft_rank=_get(section, "sft_rank", 0),
            tree_states=_as_tuple(tree_states),
            include_synthetic=bool(_get(section, "include_synthetic", False)),
            include_deleted=bool(_get(section, "include_deleted", False)),
            require_review=bool(_get(section, "require_review", True)),
            dev_fraction=dev_fraction,
            seed=seed,
            max_trees=_get(section, "max_trees", None),
            split=split or "train",
            feedback=_get(section, "oasst_feedback", None),
        )
    for name, default in OASST_ONLY.items():
        value = _get(section, name, default)
        if _comparable(name, value) != default:
            raise DataError(
                f"data.{name} = {value!r} applies to data.format 'oasst' only (format is {fmt!r}); "
                f"remove it or set data.format: oasst"
            )
    if source == "embedded":
        raise DataError(
            f"data.input 'embedded' is the OpenAssistant sample; data.format {fmt!r} needs a Hub id, "
            "a JSONL/Parquet file or a directory"
        )
    if fmt == "unpaired":
        return prepare_unpaired(source, out_dir, split=split, dev_fraction=dev_fraction, seed=seed)
    prepared = prepare_pairs(source, out_dir, format=fmt, split=split, dev_fraction=dev_fraction, seed=seed)
    return with_kto(prepared, kto_from_pair_files(prepared.output_dir, "prompt_id"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steps.data",
        description="Prepare SFT and preference files from any supported data format "
        "(OpenAssistant options: python -m steps.data.oasst --help).",
    )
    parser.add_argument("--format", default="oasst", choices=FORMATS)
    parser.add_argument("--input", required=True, help="Hub id, JSONL(.gz)/Parquet file, or directory")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--split", default=None, help="Hub split (default: the format's training split)")
    parser.add_argument("--dev-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=333)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    section = {
        "format": args.format,
        "input": args.input,
        "split": args.split,
        "dev_fraction": args.dev_fraction,
        "seed": args.seed,
    }
    try:
        prepared = prepare_data(section, args.output_dir)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = prepared.stats
    if args.format == "oasst":
        print(format_summary(prepared))
    else:
        dropped = ", ".join(f"{k}={v}" for k, v in stats["dropped"].items() if v) or "none"
        print(
            f"input: {stats['input']} ({args.format}); rows read {stats['rows_read']}, kept {stats['rows_kept']}, "
            f"malformed lines {stats['malformed_lines']['count']}; dropped: {dropped}\n"
            f"pairs: {stats['pairs']}, sft examples: {stats['sft_examples']}; output: {prepared.output_dir}"
        )
    return 0
