"""KTO examples (prompt, completion, desirable?) for every data format: ``kto.{train,dev}.jsonl`` next to the SFT and
pair files, in TRL's conversational unpaired layout, with the counts in ``stats.json`` under ``kto``.

Where they come from: OpenAssistant replies labelled by their feedback (``oasst_feedback``: the rule and why);
any pair file split into its chosen (desirable) and rejected (undesirable) reply; or TRL unpaired rows
(``data.format: unpaired``, which also writes the desirable examples as the SFT set). Examples repeat nothing:
one (prompt, completion, label) is written once; the same prompt and completion under both labels is kept and
counted (``conflicting_labels``). Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from steps.data.fairseq2_format import sft_row
from steps.data.jsonl_lines import MAX_LISTED_PROBLEMS, MalformedLines
from steps.data.oasst import SPLITS, PreparedData, write_split_files
from steps.data.oasst_examples import SftExample, iter_examples
from steps.data.oasst_feedback import SKIP_REASONS, OasstFeedbackRule, decode_feedback
from steps.data.oasst_trees import ConversationForest, tree_order_key
from steps.data.pair_formats import BadRow
from steps.data.pair_prep import _field, _prompt_hash, _Sft
from steps.data.records import ChatMessage, DataError, kto_row, pair_messages
from steps.data.records import sft_row as chat_sft_row
from steps.data.sources import iter_rows, resolve
from steps.data.splits import TreeSplit, split_trees
from steps.data.spool import AtomicFile, RoutedSpool, dumps_line
from steps.data.unpaired_formats import UNPAIRED_BAD_ROW_REASONS, UnpairedRecord, read_unpaired

logger = logging.getLogger(__name__)

KTO_FILES = tuple(f"kto.{split}" for split in SPLITS)


class ExampleKeys:
    """Which (prompt, completion, label) examples were seen, as 16-byte digests (not texts)."""

    def __init__(self) -> None:
        self._labels: dict[bytes, int] = {}  # digest of (prompt, completion) -> 1 desirable | 2 undesirable
        self.duplicates = 0
        self.conflicts = 0

    def admit(self, prompt: Sequence[ChatMessage], completion: str, label: bool) -> bool:
        """True for a new example (counted as a conflict when its prompt and completion had the other label)."""
        key = _prompt_hash(list(prompt))
        key.update(_field(b"r", completion))
        digest, bit = key.digest(), 1 if label else 2
        seen = self._labels.get(digest, 0)
        if seen & bit:
            self.duplicates += 1
            return False
        self.conflicts += bool(seen)
        self._labels[digest] = seen | bit
        return True


@dataclass
class KtoFiles:
    """What was written: ``paths`` {``kto.train``: path, ...} and the ``stats.json`` section."""

    paths: dict[str, Path]
    stats: dict[str, Any]


@dataclass
class _Counts:
    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    labels: Counter = field(default_factory=Counter)

    def stats(self, source: str, keys: ExampleKeys, **extra: Any) -> dict[str, Any]:
        return {
            "source": source,
            "desirable": self.labels[True],
            "undesirable": self.labels[False],
            **extra,
            "duplicates_removed": keys.duplicates,
            "conflicting_labels": keys.conflicts,
            "split_sizes": dict(self.sizes),
        }


class KtoWriter:
    """``kto.{train,dev}.jsonl`` written as rows arrive, each to the side its group belongs to."""

    def __init__(self, output_dir: Path, group_key: str) -> None:
        self.group_key = group_key
        self.paths = {f"kto.{split}": output_dir / f"kto.{split}.jsonl" for split in SPLITS}
        self.keys = ExampleKeys()
        self.counts = _Counts()
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, IO[bytes]] = {}

    def __enter__(self) -> KtoWriter:
        for split in SPLITS:
            self._handles[split] = self._stack.enter_context(AtomicFile(self.paths[f"kto.{split}"]))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def add(
        self,
        side: str,
        example_id: str,
        group: str,
        prompt: list[ChatMessage],
        completion: str,
        label: bool,
        **extra: Any,
    ) -> None:
        if not self.keys.admit(prompt, completion, label):
            return
        row = kto_row(example_id, self.group_key, group, prompt, completion, label, **extra)
        self._handles[side].write(dumps_line(row))
        self.counts.sizes[side] += 1
        self.counts.labels[label] += 1


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file PrefFlow wrote (lines end at "\\n" only: texts may hold U+2028)."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def kto_from_pair_files(output_dir: Path, group_key: str) -> KtoFiles:
    """Split every written pair (``preference.{train,dev}.jsonl``) into its chosen reply (desirable, id
    ``<pair id>:chosen``) and its rejected reply (undesirable, ``<pair id>:rejected``), on the pair's side."""
    with KtoWriter(output_dir, group_key) as writer:
        for split in SPLITS:
            for row in _jsonl_rows(output_dir / f"preference.{split}.jsonl"):
                prompt, chosen, rejected = pair_messages(row)
                group = str(row.get(group_key, row["id"]))
                writer.add(split, f"{row['id']}:chosen", group, prompt, chosen, True, source="pair")
                writer.add(split, f"{row['id']}:rejected", group, prompt, rejected, False, source="pair")
    stats = writer.counts.stats("pairs: chosen = desirable, rejected = undesirable", writer.keys)
    logger.info("KTO examples from pairs -> %s: %s", output_dir, _brief(stats))
    return KtoFiles(writer.paths, stats)


def tree_sides(split: TreeSplit, seed: int) -> Callable[[str], str]:
    """``tree id -> "train" | "dev"``: a tree's side in ``split``; a tree outside it (labelled replies but no SFT
    example or pair) goes where the split's seeded order puts it: dev when it sorts before the last dev tree."""
    boundary = max(((tree_order_key(t, seed), t) for t in split.dev), default=None)

    def side(tree_id: str) -> str:
        if tree_id in split.dev:
            return "dev"
        if tree_id in split.train or boundary is None:
            return "train"
        return "dev" if (tree_order_key(tree_id, seed), tree_id) <= boundary else "train"

    return side


def write_oasst_kto(
    forest: ConversationForest, output_dir: Path, side_of_tree: Callable[[str], str], rule: OasstFeedbackRule
) -> KtoFiles:
    """Label every kept assistant reply (with its whole conversation above it as the prompt, as SFT examples are
    made) by ``rule``; skipped replies are counted per reason, like replies whose history does not alternate
    user/assistant and repeated (prompt, reply) texts."""
    if rule.rule == "pairs":
        result = kto_from_pair_files(output_dir, "tree_id")
        result.stats["rule"] = rule.describe()
        return result
    index, walk = forest.index, Counter[str]()
    skipped: Counter = Counter(dict.fromkeys(SKIP_REASONS[rule.rule], 0))
    labelled_by: Counter = Counter()
    position, ids, feedback = -1, {}, {}
    with KtoWriter(output_dir, "tree_id") as writer:
        for _, where, reply in iter_examples(forest, walk, sft_rank=None):
            if not isinstance(reply, SftExample):  # the pairs of the walk: not needed here
                continue
            if reply.prompt[-1]["role"] != "user":  # an assistant message answering an assistant message
                skipped["non_alternating_history"] += 1
                continue
            if where != position:  # the walk goes tree by tree: read each tree's feedback once
                members = forest.members(forest.roots[where])
                position, ids, feedback = where, {index.message_id(i): i for i in members}, index.feedback_of(members)
            label, reason, evidence = rule.label(decode_feedback(feedback.get(ids[reply.id])))
            if label is None:
                skipped[reason] += 1
                continue
            labelled_by[reason] += 1
            writer.add(
                side_of_tree(reply.tree_id),
                reply.id,
                reply.tree_id,
                reply.prompt,
                reply.response,
                label,
                source=f"oasst_{rule.rule}",
                feedback=evidence,
            )
    skipped["non_alternating_history"] += walk["sft_skipped_non_alternating"]
    skipped["repeated_reply"] = walk["sft_duplicates_removed"]
    stats = writer.counts.stats(
        f"oasst replies labelled by {rule.rule}",
        writer.keys,
        rule=rule.describe(),
        labelled_by=dict(sorted(labelled_by.items())),
        skipped=dict(skipped),
    )
    logger.info("KTO examples from OpenAssistant feedback -> %s: %s", output_dir, _brief(stats))
    return KtoFiles(writer.paths, stats)


def _brief(stats: dict[str, Any]) -> str:
    sizes = stats["split_sizes"]
    return (
        f"{stats['desirable']} desirable, {stats['undesirable']} undesirable (train {sizes['train']}, dev "
        f"{sizes['dev']}), {stats['duplicates_removed']} repeats removed"
    )


def with_kto(prepared: PreparedData, kto: KtoFiles) -> PreparedData:
    """``prepared`` with the KTO files listed and their counts under ``stats["kto"]`` (stats.json rewritten)."""
    paths = {**prepared.paths, **kto.paths}
    paths.pop("stats", None)
    stats = {k: v for k, v in prepared.stats.items() if k != "outputs"}
    stats["kto"] = kto.stats
    return PreparedData.write_stats(prepared.output_dir, paths, stats)


# ---------------------------------------------------------------------------------- data.format: unpaired


class _LineSpool:
    """Rendered rows tagged with their group's position, routed to train/dev files once the split is known."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="prefflow-kto-")  # noqa: SIM115 (closed by close())
        self.groups = array("q")
        self.labels = bytearray()

    def add(self, group: int, label: bool, line: bytes) -> None:
        self.file.write(line)
        self.groups.append(group)
        self.labels.append(label)

    def route(self, side_of: Callable[[int], str], paths: dict[str, Path]) -> _Counts:
        counts = _Counts()
        self.file.flush()
        self.file.seek(0)
        with contextlib.ExitStack() as stack:
            handles = {side: stack.enter_context(AtomicFile(path)) for side, path in paths.items()}
            for group, label, line in zip(self.groups, self.labels, self.file):
                side = side_of(group)
                handles[side].write(line)
                counts.sizes[side] += 1
                counts.labels[bool(label)] += 1
        return counts

    def close(self) -> None:
        self.file.close()


class _UnpairedCollector:
    """Checks and de-duplicates unpaired rows; spools KTO rows and the desirable ones as SFT examples."""

    def __init__(self) -> None:
        self.rows_read = 0
        self.dropped: Counter = Counter()
        self.problem_examples: list[dict[str, Any]] = []
        self.layouts: Counter = Counter()
        self.groups: dict[str, int] = {}
        self.keys = ExampleKeys()
        self.ids: set[str] = set()
        self.kto = _LineSpool()
        self.sft = RoutedSpool()

    def bad(self, where: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if len(self.problem_examples) < MAX_LISTED_PROBLEMS:
            self.problem_examples.append({"reason": reason, "where": where, "detail": detail})

    def add(self, where: str, raw: Any) -> None:
        self.rows_read += 1
        try:
            record = read_unpaired(raw)
        except BadRow as exc:
            self.bad(where, exc.reason, exc.detail)
            return
        if record.id is not None and record.id in self.ids:
            self.bad(where, "duplicate_id", f"id {record.id!r} was used by an earlier row")
            return
        if not self.keys.admit(record.prompt, record.completion, record.label):
            self.bad(where, "duplicate_example", "same prompt, completion and label as an earlier row")
            return
        digest = _example_digest(record)
        example_id = record.id or f"unpaired-{digest[:16]}"
        self.ids.add(example_id)
        self.layouts[record.layout] += 1
        group = record.group or f"prompt-{_prompt_hash(record.prompt).hexdigest()[:16]}"
        position = self.groups.setdefault(group, len(self.groups))
        row = kto_row(example_id, "prompt_id", group, record.prompt, record.completion, record.label)
        self.kto.add(position, record.label, dumps_line(row))
        if record.label:  # desirable completions are the SFT set (once each, as the KTO rows already are)
            example = _Sft(f"sft-{digest[:16]}", group, record.prompt, record.completion)
            chat = chat_sft_row(example.id, "prompt_id", group, example.prompt, example.response)
            self.sft.add(position, dumps_line(chat), dumps_line(sft_row(example)))

    def close(self) -> None:
        self.kto.close()
        self.sft.close()


def _example_digest(record: UnpairedRecord) -> str:
    key = _prompt_hash(record.prompt)
    key.update(_field(b"r", record.completion) + _field(b"l", "1" if record.label else "0"))
    return hashlib.blake2b(key.digest(), digest_size=16).hexdigest()


def prepare_unpaired(
    input: str, output_dir: str | Path, *, split: str | None = None, dev_fraction: float = 0.1, seed: int = 333
) -> PreparedData:
    """Read TRL unpaired rows (file, directory or Hub id) and write ``kto.{train,dev}.jsonl``, the desirable
    examples as ``sft.*`` / ``fairseq2/sft.*`` (there are no pairs: a pairwise loss cannot train on this data), and
    ``stats.json``. The split is by prompt group, seeded. Rows that cannot be used are counted per reason
    (``rows_read == rows_kept + sum(dropped)``), never fatal; nothing usable at all is a DataError."""
    if not 0.0 <= dev_fraction < 1.0:
        raise DataError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    split = split or "train"
    source = resolve(str(input))
    malformed = MalformedLines()
    collector = _UnpairedCollector()
    try:
        for where, raw in iter_rows(source, malformed, split):
            collector.add(where, raw)
        return _write_unpaired(collector, source, malformed, Path(output_dir), split, dev_fraction, seed)
    finally:
        collector.close()


def _write_unpaired(
    c: _UnpairedCollector,
    source: Any,
    malformed: MalformedLines,
    output_dir: Path,
    split: str,
    dev_fraction: float,
    seed: int,
) -> PreparedData:
    kept = len(c.kto.groups)
    if not kept:
        reasons = {k: v for k, v in c.dropped.most_common() if v}
        raise DataError(
            f"{source.spec}: no usable rows for data.format 'unpaired': {c.rows_read} rows read ({malformed.count} "
            f"malformed lines), dropped per reason: {reasons}; first problems: {c.problem_examples[:3]}. Rows need "
            "prompt, completion and a true/false label (TRL's unpaired layout)."
        )
    groups = split_trees(c.groups, dev_fraction=dev_fraction, seed=seed)
    dev_positions = {c.groups[g] for g in groups.dev}
    side_of = lambda p: "dev" if p in dev_positions else "train"  # noqa: E731
    paths, sizes = write_split_files(output_dir, {"sft": c.sft}, side_of)
    kto_paths = {f"kto.{s}": output_dir / f"kto.{s}.jsonl" for s in SPLITS}
    counts = c.kto.route(side_of, {s: kto_paths[f"kto.{s}"] for s in SPLITS})
    stats: dict[str, Any] = {
        "input": source.spec,
        "format": "unpaired",
        "source": source.describe(),
        "rows_read": c.rows_read,
        "malformed_lines": malformed.as_dict(),
        "layouts": dict(sorted(c.layouts.items())),
        "settings": {"format": "unpaired", "split": split, "dev_fraction": dev_fraction, "seed": seed},
        "rows_kept": kept,
        "dropped": {reason: c.dropped.get(reason, 0) for reason in UNPAIRED_BAD_ROW_REASONS},
        "problem_examples": c.problem_examples,
        "groups": len(c.groups),
        "sft_examples": len(c.sft),
        "sft_source": "the desirable examples, once per distinct (prompt, completion)",
        "pairs": 0,
        "split_sizes": {"groups": {"train": len(groups.train), "dev": len(groups.dev)}, **sizes},
        "kto": counts.stats("unpaired rows (TRL layout)", c.keys),
    }
    prepared = PreparedData.write_stats(output_dir, {**paths, **kto_paths}, stats)
    logger.info(
        "%s (unpaired) -> %s: %d rows read, %s, %d dropped",
        source.spec,
        output_dir,
        c.rows_read,
        _brief(stats["kto"]),
        sum(c.dropped.values()),
    )
    return prepared
