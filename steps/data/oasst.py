"""OpenAssistant (oasst1/oasst2) -> SFT examples and preference pairs, in chat form and fairseq2 form.

``prepare_oasst`` streams the input into a tree index, then writes every output file (layout in its docstring).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steps.data.fairseq2_format import preference_row, sft_row
from steps.data.oasst_examples import PAIR_STRATEGIES, iter_examples
from steps.data.oasst_index import MessageIndex
from steps.data.oasst_read import EMBEDDED_SAMPLE, OasstDataError, OasstInputNotFoundError, read_oasst
from steps.data.oasst_trees import DROP_REASONS, MessageFilters, build_forest
from steps.data.splits import split_trees
from steps.data.spool import RoutedSpool, dumps_line
from steps.io import write_json

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_SAMPLE",
    "PAIR_STRATEGIES",
    "OasstDataError",
    "OasstInputNotFoundError",
    "PreparedData",
    "main",
    "prepare_oasst",
]

SPLITS = ("train", "dev")
RANK_COUNTS = (
    "ranked_groups",
    "ranked_groups_with_gaps",
    "ranked_groups_with_ties",
    "ranked_groups_without_rank0",
    "ranked_groups_all_tied",
    "unranked_replies",
    "unranked_beside_ranked",
)


@dataclass
class PreparedData:
    """Where the prepared files are (keys like ``sft.train``, ``fairseq2/preference.dev``, ``stats``) and the stats."""

    output_dir: Path
    paths: dict[str, Path]
    stats: dict[str, Any]

    @classmethod
    def write_stats(cls, output_dir: Path, paths: dict[str, Path], stats: dict[str, Any]) -> PreparedData:
        """List the written files under ``stats["outputs"]`` and write ``stats.json`` beside them."""
        stats["outputs"] = {key: str(path.relative_to(output_dir)) for key, path in paths.items()} | {
            "stats": "stats.json"
        }
        paths["stats"] = write_json(output_dir / "stats.json", stats)
        return cls(output_dir=output_dir, paths=paths, stats=stats)


@dataclass(frozen=True)
class _Settings:
    """What ``prepare_oasst`` was asked for besides the message filters (``settings`` in stats.json, in order)."""

    pair_strategy: str
    sft_rank: int | None
    dev_fraction: float
    seed: int
    max_trees: int | None
    split: str


def _normalise_choice(values: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """``None`` / empty / ``"all"`` mean no restriction; a single string is one value."""
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    values = tuple(v for v in values if v)
    if not values or "all" in values:
        return None
    return values


def _read_stats(index: MessageIndex) -> dict[str, Any]:
    languages = index.languages
    return {
        "input": index.source,
        "format": index.format,
        "messages_read": len(index),
        "malformed_lines": index.malformed.as_dict(),
        "languages_seen": dict(sorted(languages.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def write_split_files(output_dir: Path, spools: dict[str, RoutedSpool], side_of: Any) -> tuple[dict, dict]:
    """Route each kind's spooled rows to ``{kind}.{split}.jsonl`` and ``fairseq2/{kind}.{split}.jsonl``."""
    paths: dict[str, Path] = {}
    sizes: dict[str, dict[str, int]] = {}
    for kind, spool in spools.items():
        targets = [
            {name: output_dir / prefix / f"{kind}.{name}.jsonl" for name in SPLITS} for prefix in ("", "fairseq2")
        ]
        sizes[kind] = spool.route(side_of, targets)
        for name in SPLITS:
            paths[f"{kind}.{name}"] = targets[0][name]
            paths[f"fairseq2/{kind}.{name}"] = targets[1][name]
    return paths, sizes


@dataclass(frozen=True)
class OasstOptions:
    """What ``prepare_oasst`` keeps of an OpenAssistant export and how it splits it (the ``data`` section's oasst
    fields, steps.config.schema.DataConfig; ``prepare_data`` builds one from it)."""

    langs: Sequence[str] | None = ("en",)
    pair_strategy: str = "best_vs_rest"
    sft_rank: int | None = 0
    tree_states: Sequence[str] | None = ("ready_for_export",)
    include_synthetic: bool = False
    include_deleted: bool = False
    require_review: bool = True
    dev_fraction: float = 0.1
    seed: int = 333
    max_trees: int | None = None
    split: str = "train"
    feedback: Any = None


def prepare_oasst(input: str, output_dir: str | Path, options: OasstOptions | None = None) -> PreparedData:
    """Prepare OpenAssistant data for SFT and preference training, writing atomically::

        OUTPUT_DIR/sft.{train,dev}.jsonl                 {"id", "tree_id", "prompt": [messages], "response"}
        OUTPUT_DIR/preference.{train,dev}.jsonl          {"id", "tree_id", "prompt": [messages],
                                                          "chosen": [assistant message], "rejected": [...],
                                                          "chosen_rank", "rejected_rank"}   (TRL conversational)
        OUTPUT_DIR/fairseq2/sft.{train,dev}.jsonl        {"id", "src", "tgt"}
        OUTPUT_DIR/fairseq2/preference.{train,dev}.jsonl {"id", "src", "tgt_chosen", "tgt_rejected"}
        OUTPUT_DIR/kto.{train,dev}.jsonl                 {"id", "tree_id", "prompt": [messages],
                                                          "completion": [assistant message], "label", ...}
        OUTPUT_DIR/stats.json                            counts of everything read, kept, dropped and written

    ``input``: ``"embedded"`` (the small original sample shipped here), a local file, or a Hub dataset id read with
    ``datasets.load_dataset(input, split=split)``. ``langs`` / ``tree_states``: ``None``, empty or ``"all"`` keep
    everything. ``sft_rank``: rank of the replies used for SFT (``None`` = every assistant reply, ranked or not).
    ``max_trees``: keep a seeded subset of that many trees. Only ``pair_strategy`` is written; ``stats.json`` counts
    pairs for all of them. ``feedback``: how replies become KTO examples (an ``oasst_feedback.OasstFeedbackRule``,
    a mapping of its fields, or None: quality labels). The train/dev split is by tree (``splits``). Memory holds the
    tree index, not the texts (see ``oasst_index``). Raises ``OasstDataError`` when nothing usable is left, naming
    the input and the filters; ``options`` (default ``OasstOptions()``) holds the settings named here.
    """
    o = options or OasstOptions()
    langs, pair_strategy, sft_rank, tree_states = o.langs, o.pair_strategy, o.sft_rank, o.tree_states
    dev_fraction, seed, max_trees, split = o.dev_fraction, o.seed, o.max_trees, o.split
    if pair_strategy not in PAIR_STRATEGIES:
        raise OasstDataError(f"pair_strategy {pair_strategy!r} is unknown; choose one of {PAIR_STRATEGIES}")
    if not 0.0 <= dev_fraction < 1.0:
        raise OasstDataError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    if sft_rank is not None and (isinstance(sft_rank, bool) or not isinstance(sft_rank, int) or sft_rank < 0):
        raise OasstDataError(f"sft_rank must be a non-negative integer or None (every reply), got {sft_rank!r}")
    if max_trees is not None and max_trees < 1:
        raise OasstDataError(f"max_trees must be a positive number of trees or None, got {max_trees}")
    filters = MessageFilters(
        langs=_normalise_choice(langs),
        tree_states=_normalise_choice(tree_states),
        include_deleted=o.include_deleted,
        require_review=o.require_review,
        include_synthetic=o.include_synthetic,
    )
    settings = _Settings(pair_strategy, sft_rank, dev_fraction, seed, max_trees, split)
    from steps.data.oasst_feedback import OasstFeedbackRule

    feedback_rule = OasstFeedbackRule.of(o.feedback)
    spools = {"sft": RoutedSpool(), "preference": RoutedSpool()}
    try:
        with read_oasst(input, split=split) as index:
            return _prepare(index, Path(output_dir), filters, spools, settings, feedback_rule)
    finally:
        for spool in spools.values():
            spool.close()


def _prepare(
    index: MessageIndex,
    output_dir: Path,
    filters: MessageFilters,
    spools: dict[str, RoutedSpool],
    settings: _Settings,
    feedback: Any,
) -> PreparedData:
    from steps.data.unpaired_prep import tree_sides, write_oasst_kto

    pair_strategy, sft_rank = settings.pair_strategy, settings.sft_rank
    forest = build_forest(index, filters, max_trees=settings.max_trees, seed=settings.seed)
    counts: Counter = Counter()
    pair_counts = Counter(dict.fromkeys(PAIR_STRATEGIES, 0))
    usable_trees: set[str] = set()
    for kind, position, item in iter_examples(forest, counts, sft_rank=sft_rank):
        if kind == "sft":
            usable_trees.add(item.tree_id)
            spools["sft"].add(position, dumps_line(item.to_row()), dumps_line(sft_row(item)))
            continue
        pair_counts[kind] += 1
        if kind == "all_ordered_pairs":
            usable_trees.add(item.tree_id)
        if kind == pair_strategy:
            spools["preference"].add(position, dumps_line(item.to_row()), dumps_line(preference_row(item)))
    n_sft, n_pairs = len(spools["sft"]), len(spools["preference"])

    if not n_sft and not n_pairs:
        dropped = {k: v for k, v in sorted(forest.dropped.items()) if v}
        raise OasstDataError(
            f"{index.source}: no usable conversation: {len(index)} messages read "
            f"({index.malformed.count} malformed lines), {forest.kept} kept in {len(forest.roots)} trees, "
            f"0 SFT examples (sft_rank={sft_rank}) and 0 {pair_strategy} pairs. Filters: {filters.describe()}; "
            f"dropped per reason: {dropped}. Widen the filters (e.g. --lang all, --tree-state all) or check the file."
        )
    if not n_sft or not n_pairs:
        logger.warning(
            "%s: %d SFT examples, %d %s pairs: one of the outputs is empty", index.source, n_sft, n_pairs, pair_strategy
        )

    tree_split = split_trees(usable_trees, dev_fraction=settings.dev_fraction, seed=settings.seed)
    dev_roots = {p for p, root in enumerate(forest.roots) if forest.tree_id[root] in tree_split.dev}
    paths, sizes = write_split_files(output_dir, spools, lambda p: "dev" if p in dev_roots else "train")
    split_sizes: dict[str, dict[str, int]] = {"trees": {"train": len(tree_split.train), "dev": len(tree_split.dev)}}
    split_sizes.update(sizes)
    kto = write_oasst_kto(forest, output_dir, tree_sides(tree_split, settings.seed), feedback)
    paths.update(kto.paths)

    stats: dict[str, Any] = {
        **_read_stats(index),
        "settings": {**filters.describe(), **asdict(settings)},
        "messages_kept": forest.kept,
        "dropped": {reason: forest.dropped.get(reason, 0) for reason in DROP_REASONS},
        "problem_examples": forest.problem_examples,
        "trees": {"read": index.trees_read, "kept": len(forest.roots), "usable": len(usable_trees)},
        "sft_examples": n_sft,
        "pairs": dict(pair_counts),
        "ranks": {key: counts.get(key, 0) for key in RANK_COUNTS},
        "skipped": {
            "sft_duplicates_removed": counts.get("sft_duplicates_removed", 0),
            "sft_skipped_non_alternating": counts.get("sft_skipped_non_alternating", 0),
            "pair_groups_skipped_non_alternating": counts.get("pair_groups_skipped_non_alternating", 0),
            "identical_text_pairs": {s: counts.get(f"identical_text_pairs_skipped.{s}", 0) for s in PAIR_STRATEGIES},
            "duplicate_pairs_removed": {s: counts.get(f"duplicate_pairs_removed.{s}", 0) for s in PAIR_STRATEGIES},
        },
        "split_sizes": split_sizes,
        "kto": kto.stats,
    }
    prepared = PreparedData.write_stats(output_dir, paths, stats)
    logger.info(
        "%s -> %s: %d SFT examples, %d %s pairs (train/dev trees %d/%d)",
        index.source,
        output_dir,
        n_sft,
        n_pairs,
        pair_strategy,
        split_sizes["trees"]["train"],
        split_sizes["trees"]["dev"],
    )
    return prepared


def _split_list_args(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also accept comma lists: ``--lang en --lang de`` == ``--lang en,de``."""
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _sft_rank_arg(value: str) -> int | None:
    if value == "all":
        return None
    try:
        rank = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sft-rank must be a non-negative integer or 'all', got {value!r}") from None
    if rank < 0:
        raise argparse.ArgumentTypeError(f"--sft-rank must be a non-negative integer or 'all', got {value!r}")
    return rank


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m steps.data.oasst",
        description="Prepare OpenAssistant SFT examples and preference pairs (chat JSONL + fairseq2 JSONL).",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="Hub dataset id (e.g. OpenAssistant/oasst2), a parquet/JSONL(.gz)/trees.jsonl(.gz) file, or 'embedded'",
    )
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument(
        "--lang",
        dest="langs",
        action="append",
        metavar="LANG",
        help="language(s) to keep; repeatable or comma list; 'all' keeps every language (default: en)",
    )
    parser.add_argument(
        "--pairs", dest="pair_strategy", default="best_vs_rest", choices=PAIR_STRATEGIES, help="pair strategy to write"
    )
    parser.add_argument(
        "--sft-rank", default=0, type=_sft_rank_arg, help="rank of replies used for SFT, or 'all' (default 0)"
    )
    parser.add_argument(
        "--tree-state",
        dest="tree_states",
        action="append",
        metavar="STATE",
        help="tree states to keep; repeatable or comma list; 'all' (default: ready_for_export)",
    )
    parser.add_argument("--include-synthetic", action="store_true")
    parser.add_argument("--include-deleted", action="store_true")
    parser.add_argument(
        "--no-require-review",
        dest="require_review",
        action="store_false",
        help="keep messages whose review_result is not true",
    )
    parser.add_argument("--dev-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=333)
    parser.add_argument("--max-trees", type=int, default=None)
    parser.add_argument("--split", default="train", help="Hub split to read (Hub ids only)")
    return parser


def format_summary(prepared: PreparedData) -> str:
    """A few human-readable lines; the full numbers are in stats.json."""
    s = prepared.stats
    dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items() if v) or "none"
    sizes = s["split_sizes"]
    return "\n".join(
        [
            f"input: {s['input']} ({s['format']} format)",
            f"messages: read {s['messages_read']}, kept {s['messages_kept']}; dropped: {dropped}; "
            f"malformed lines: {s['malformed_lines']['count']}",
            f"trees: read {s['trees']['read']}, kept {s['trees']['kept']}, usable {s['trees']['usable']} "
            f"(train {sizes['trees']['train']}, dev {sizes['trees']['dev']})",
            f"sft examples: {s['sft_examples']} (train {sizes['sft']['train']}, dev {sizes['sft']['dev']})",
            "pairs: "
            + ", ".join(f"{k}={v}" for k, v in s["pairs"].items())
            + f"; written {s['settings']['pair_strategy']} (train {sizes['preference']['train']}, "
            f"dev {sizes['preference']['dev']})",
            f"output: {prepared.output_dir} (stats.json has every count)",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = vars(build_arg_parser().parse_args(argv))  # every option is stored under prepare_oasst's keyword
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for key, default in (("langs", ("en",)), ("tree_states", ("ready_for_export",))):
        values = _split_list_args(options[key])
        options[key] = default if values is None else values
    try:
        prepared = prepare_oasst(options.pop("input"), options.pop("output_dir"), OasstOptions(**options))
    except OasstDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(prepared))
    return 0


if __name__ == "__main__":
    sys.exit(main())
