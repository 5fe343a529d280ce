"""Preference / instruction rows of any supported format -> the same SFT and pair files (and stats) as OpenAssistant.

One streaming pass: rows are checked, de-duplicated and spooled; the seeded split by prompt then routes them.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.data.fairseq2_format import preference_row, sft_row
from steps.data.jsonl_lines import MAX_LISTED_PROBLEMS, MalformedLines
from steps.data.oasst import PreparedData, write_split_files
from steps.data.pair_formats import READERS, REFERENCE_KEYS, BadRow, PairRecord, SftRecord, read_row
from steps.data.records import ChatMessage, DataError, pair_row
from steps.data.records import sft_row as chat_sft_row
from steps.data.sources import iter_rows, resolve
from steps.data.splits import split_trees
from steps.data.spool import RoutedSpool, dumps_line

logger = logging.getLogger(__name__)

PAIR_FORMATS = tuple(READERS)
BAD_ROW_REASONS = (
    "missing_field",
    "invalid_field",
    "invalid_message",
    "no_common_prompt",
    "prompt_not_ending_with_user",
    "empty_prompt",
    "multi_turn_completion",
    "last_turn_not_assistant",
    "unparsable_transcript",
    "prompt_mismatch",
    "unparsable_src",
    "empty_response",
    "identical_responses",
    "incomplete_reference_score",
    "invalid_reference_score",
    "duplicate_pair",
    "duplicate_id",
)
DEFAULT_SPLIT = {"ultrafeedback": "train_prefs"}
"""Hub split read when none is given (UltraFeedback binarized has ``train_prefs`` / ``test_prefs``, no ``train``)."""


@dataclass
class _Pair:
    """What the row writers need of a pair (``fairseq2_format.preference_row`` reads these attributes)."""

    id: str
    group: str
    prompt: list[ChatMessage]
    chosen: str
    rejected: str
    extra: dict[str, Any]
    reference_score_chosen: float | None = None
    reference_score_rejected: float | None = None


@dataclass
class _Sft:
    id: str
    group: str
    prompt: list[ChatMessage]
    response: str


def _field(tag: bytes, text: str) -> bytes:
    data = text.encode("utf-8")
    return tag + len(data).to_bytes(8, "little") + data


def _prompt_hash(prompt: list[ChatMessage]) -> Any:
    digest = hashlib.blake2b(digest_size=16)
    for message in prompt:
        digest.update(_field(message["role"].encode("ascii")[:1], message["content"]))
    return digest


#: How each kind of row is de-duplicated: (``seen`` set of content digests, ``seen`` set of ids, prefix of derived
#: ids (None: the format's name), the detail of a repeated content, what an id belongs to).
_UNIQUE: dict[str, tuple[str, str, str | None, str, str]] = {
    "pair": ("pair", "pair_id", None, "same prompt, chosen and rejected as an earlier row", "pair"),
    "instruction": (
        "instruction_sft",
        "sft_id",
        "sft",
        "same prompt and response as an earlier instruction row",
        "instruction row",
    ),
}


class _Collector:
    """Checks, de-duplicates and spools rows; remembers one position per prompt group."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.rows_read = 0
        self.dropped: Counter = Counter()
        self.problem_examples: list[dict[str, Any]] = []
        self.layouts: Counter = Counter()
        self.groups: dict[str, int] = {}
        self.spools = {"preference": RoutedSpool(), "derived_sft": RoutedSpool(), "instruction_sft": RoutedSpool()}
        self.seen: dict[str, set] = {
            "pair": set(),
            "derived_sft": set(),
            "instruction_sft": set(),
            "pair_id": set(),
            "sft_id": set(),
        }
        self.with_reference = 0
        self.sft_duplicates = 0

    def bad(self, where: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if len(self.problem_examples) < MAX_LISTED_PROBLEMS:
            self.problem_examples.append({"reason": reason, "where": where, "detail": detail})

    def _position(self, group: str) -> int:
        return self.groups.setdefault(group, len(self.groups))

    def add(self, where: str, raw: Any) -> None:
        self.rows_read += 1
        try:
            record = read_row(self.fmt, raw)
        except BadRow as exc:
            self.bad(where, exc.reason, exc.detail)
            return
        self.layouts[record.layout] += 1
        if isinstance(record, SftRecord):
            self._add_instruction(where, record)
        else:
            self._add_pair(where, record)

    def _admit(
        self, where: str, record: PairRecord | SftRecord, content: bytes, kind: str
    ) -> tuple[str, str, Any] | None:
        """``(id, group, prompt hash)`` of a row whose content and id are both new for its kind; None (and the
        drop counted) for a repeat. Derived ids and groups are the content's and the prompt's digests."""
        contents, ids, prefix, repeated, owner = _UNIQUE[kind]
        prompt_hash = _prompt_hash(record.prompt)
        key = prompt_hash.copy()
        key.update(content)
        digest = key.digest()
        if digest in self.seen[contents]:
            self.bad(where, "duplicate_pair", repeated)
            return None
        example_id = record.id or f"{prefix or self.fmt}-{digest.hex()[:16]}"
        if example_id in self.seen[ids]:
            self.bad(where, "duplicate_id", f"id {example_id!r} was used by an earlier {owner}")
            return None
        self.seen[contents].add(digest)
        self.seen[ids].add(example_id)
        return example_id, record.group or f"prompt-{prompt_hash.hexdigest()[:16]}", prompt_hash

    def _add_pair(self, where: str, record: PairRecord) -> None:
        admitted = self._admit(where, record, _field(b"c", record.chosen) + _field(b"x", record.rejected), "pair")
        if admitted is None:
            return
        pair_id, group, prompt_hash = admitted
        position = self._position(group)
        pair = _Pair(
            pair_id,
            group,
            record.prompt,
            record.chosen,
            record.rejected,
            record.extra,
            record.extra.get(REFERENCE_KEYS[0]),
            record.extra.get(REFERENCE_KEYS[1]),
        )
        self.with_reference += pair.reference_score_chosen is not None
        chat = pair_row(pair.id, "prompt_id", group, pair.prompt, pair.chosen, pair.rejected, **pair.extra)
        self.spools["preference"].add(position, dumps_line(chat), dumps_line(preference_row(pair)))

        sft_key = prompt_hash.copy()
        sft_key.update(_field(b"r", record.chosen))
        sft_digest = sft_key.digest()
        if sft_digest not in self.seen["derived_sft"]:
            self.seen["derived_sft"].add(sft_digest)
            self._spool_sft(
                "derived_sft", position, _Sft(f"sft-{sft_digest.hex()[:16]}", group, record.prompt, record.chosen)
            )

    def _add_instruction(self, where: str, record: SftRecord) -> None:
        admitted = self._admit(where, record, _field(b"r", record.response), "instruction")
        if admitted is not None:
            sft_id, group, _ = admitted
            self._spool_sft(
                "instruction_sft", self._position(group), _Sft(sft_id, group, record.prompt, record.response)
            )

    def _spool_sft(self, name: str, position: int, example: _Sft) -> None:
        chat = chat_sft_row(example.id, "prompt_id", example.group, example.prompt, example.response)
        self.spools[name].add(position, dumps_line(chat), dumps_line(sft_row(example)))

    def close(self) -> None:
        for spool in self.spools.values():
            spool.close()


def prepare_pairs(
    input: str,
    output_dir: str | Path,
    *,
    format: str = "preference",
    split: str | None = None,
    dev_fraction: float = 0.1,
    seed: int = 333,
) -> PreparedData:
    """Read ``input`` (file, directory, MANIFEST directory or Hub id) in ``format`` and write the same files as
    ``prepare_oasst``: ``sft.*`` / ``preference.*`` (TRL conversational), ``fairseq2/...`` and ``stats.json``.

    Pair rows are ``{"id", "prompt_id", "prompt", "chosen", "rejected"}`` plus ``score_*`` / ``reference_score_*``
    when the input has them. SFT rows are prompt + chosen, once per distinct (prompt, chosen), unless the input
    holds fairseq2 instruction rows (``src``/``tgt``), which then are the SFT set. The train/dev split is by
    prompt group (``prompt_id`` if given, else the prompt text), seeded and independent of row order. Rows that
    cannot be used are counted per reason (``rows_read == rows_kept + sum(dropped)``), never fatal.
    """
    if format not in READERS:
        raise DataError(f"data.format {format!r} is not a pair format; choose one of {PAIR_FORMATS}")
    if not 0.0 <= dev_fraction < 1.0:
        raise DataError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    split = split or DEFAULT_SPLIT.get(format, "train")
    source = resolve(str(input))
    malformed = MalformedLines()
    collector = _Collector(format)
    try:
        for where, raw in iter_rows(source, malformed, split):
            collector.add(where, raw)
        return _write(
            collector,
            source,
            malformed,
            Path(output_dir),
            format=format,
            split=split,
            dev_fraction=dev_fraction,
            seed=seed,
        )
    finally:
        collector.close()


def _write(
    c: _Collector,
    source: Any,
    malformed: MalformedLines,
    output_dir: Path,
    *,
    format: str,
    split: str,
    dev_fraction: float,
    seed: int,
) -> PreparedData:
    pairs = c.spools["preference"]
    instruction = len(c.spools["instruction_sft"]) > 0
    sft = c.spools["instruction_sft" if instruction else "derived_sft"]
    if not len(pairs) and not len(sft):
        reasons = {k: v for k, v in c.dropped.most_common() if v}
        raise DataError(
            f"{source.spec}: no usable rows for data.format {format!r}: {c.rows_read} rows read "
            f"({malformed.count} malformed lines), dropped per reason: {reasons}; first problems: "
            f"{c.problem_examples[:3]}. Check that data.format matches the file (see the README's Data formats)."
        )
    if not len(pairs):
        logger.warning("%s: %d SFT examples but no preference pairs", source.spec, len(sft))
    if 0 < c.with_reference < len(pairs):
        logger.warning(
            "%s: %d of %d pairs carry reference scores; the trainer uses them only when every pair has "
            "them, so it will compute reference log-probs",
            source.spec,
            c.with_reference,
            len(pairs),
        )
    tree_split = split_trees(c.groups, dev_fraction=dev_fraction, seed=seed)
    dev_positions = {c.groups[g] for g in tree_split.dev}
    paths, sizes = write_split_files(
        output_dir, {"sft": sft, "preference": pairs}, lambda p: "dev" if p in dev_positions else "train"
    )
    rows_kept = len(pairs) + (len(sft) if instruction else 0)
    stats: dict[str, Any] = {
        "input": source.spec,
        "format": format,
        "source": source.describe(),
        "rows_read": c.rows_read,
        "malformed_lines": malformed.as_dict(),
        "layouts": dict(sorted(c.layouts.items())),
        "settings": {"format": format, "split": split, "dev_fraction": dev_fraction, "seed": seed},
        "rows_kept": rows_kept,
        "dropped": {reason: c.dropped.get(reason, 0) for reason in BAD_ROW_REASONS},
        "problem_examples": c.problem_examples,
        "groups": len(c.groups),
        "sft_examples": len(sft),
        "sft_source": "instruction rows (src/tgt)" if instruction else "pairs: prompt + chosen, once per distinct pair",
        "pairs": len(pairs),
        "reference_scores": {"pairs_with": c.with_reference, "pairs_without": len(pairs) - c.with_reference},
        "split_sizes": {"groups": {"train": len(tree_split.train), "dev": len(tree_split.dev)}, **sizes},
    }
    prepared = PreparedData.write_stats(output_dir, paths, stats)
    logger.info(
        "%s (%s) -> %s: %d rows read, %d pairs, %d SFT examples, %d dropped",
        source.spec,
        format,
        output_dir,
        c.rows_read,
        len(pairs),
        len(sft),
        sum(c.dropped.values()),
    )
    return prepared
