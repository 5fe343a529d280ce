"""The one entry point the flow calls: ``prepare_data(data_section, out_dir)`` for every ``data.format``, with the
typed ``data`` section (steps.config.schema.DataConfig owns its defaults).

CLI: ``python -m steps.data --format hh_rlhf --input FILE --output-dir DIR`` (``--help`` for the rest).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from steps.config.schema import DataConfig
from steps.data.oasst import OasstOptions, PreparedData, format_summary, prepare_oasst
from steps.data.pair_prep import PAIR_FORMATS, prepare_pairs
from steps.data.records import DataError
from steps.data.unpaired_prep import kto_from_pair_files, prepare_unpaired, with_kto

logger = logging.getLogger(__name__)

FORMATS = ("oasst", *PAIR_FORMATS, "unpaired")


def prepare_data(section: DataConfig, out_dir: str | Path) -> PreparedData:
    """Prepare ``section`` (the config's typed ``data`` section) into ``out_dir``: ``sft.{train,dev}.jsonl``,
    ``preference.{train,dev}.jsonl`` (TRL conversational), ``kto.{train,dev}.jsonl`` (TRL unpaired: always, see
    ``unpaired_prep``), ``fairseq2/...`` and ``stats.json``.

    The section's fields and defaults are DataConfig's (steps.config.schema). Raises ``DataError`` naming the field
    for an unknown format or an oasst-only field set to a non-default value with another format (it would be
    silently ignored).
    """
    fmt, source, split = section.format, section.input, section.split
    if fmt not in FORMATS:
        raise DataError(f"data.format {fmt!r} is unknown; choose one of {FORMATS}")
    if fmt == "oasst":
        options = OasstOptions(
            langs=tuple(section.langs) or None,
            pair_strategy=section.pair_strategy,
            sft_rank=section.sft_rank,
            tree_states=tuple(section.tree_states) or None,
            include_synthetic=section.include_synthetic,
            include_deleted=section.include_deleted,
            require_review=section.require_review,
            dev_fraction=section.dev_fraction,
            seed=section.seed,
            max_trees=section.max_trees,
            split=split or "train",
            feedback=section.oasst_feedback,
        )
        return prepare_oasst(source, out_dir, options)
    defaults = type(section)()
    for name in section.OASST_ONLY:
        value = getattr(section, name)
        if value != getattr(defaults, name):
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
        return prepare_unpaired(source, out_dir, split=split, dev_fraction=section.dev_fraction, seed=section.seed)
    prepared = prepare_pairs(
        source, out_dir, format=fmt, split=split, dev_fraction=section.dev_fraction, seed=section.seed
    )
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
    parser.add_argument("--dev-fraction", type=float, default=DataConfig.dev_fraction)
    parser.add_argument("--seed", type=int, default=DataConfig.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fields = {"format": args.format, "input": args.input, "split": args.split}
    section = DataConfig(**fields, dev_fraction=args.dev_fraction, seed=args.seed)
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
