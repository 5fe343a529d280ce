"""OpenAssistant's per-message feedback (annotators' ``labels``, users' ``emojis``) and the rule that turns an
assistant reply into a desirable or an undesirable KTO example, or skips it with a counted reason.

The rule (``OasstFeedbackRule``, ``data.oasst_feedback`` in the config) and why it is the default:

* ``quality`` (default). Every reviewed reply was rated by its reviewers (3 on most replies) on OASST's 5-point
  quality scale, stored as the mean in [0, 1] (0, 0.25, 0.5, 0.75, 1 per vote); flags such as ``fails_task`` or
  ``spam`` are stored as the share of reviewers who set them. A reply is **undesirable** when at least
  ``flag_min_share`` of its reviewers set one of ``flags``, or its mean quality is below
  ``undesirable_below_quality`` (0.5: below the scale's middle); **desirable** when unflagged with mean quality at
  least ``desirable_min_quality`` (0.75: "good" on average); skipped when in between, or rated by fewer than
  ``min_quality_votes`` reviewers, or unrated. Why: the ratings are absolute judgements of one reply, solicited
  from every reviewer (an unpaired thumb is exactly what KTO learns from), and nearly every reviewed reply has
  them. On ``oasst1_en_validation.part1.messages.jsonl`` (605 replies after the default filters) the rule gives
  305 desirable, 119 undesirable, 181 skipped, and agrees with the human sibling ranking on 79 of the 92 ranked
  sibling pairs it labels differently (86 %).
* ``emoji``: users' thumbs. Net votes (``+1`` minus ``-1``) of at least ``min_net_votes`` -> desirable, at most
  ``-min_net_votes`` (or any ``red_flag``) -> undesirable, else skipped. Votes are optional and sparse (182 of the
  605 replies above have none; 306 desirable, 91 undesirable) and agree less with the ranking (56 of 78 pairs,
  72 %), but they are all the export's ``*.trees.jsonl`` files may carry: ``oasst_en100_ready.trees.jsonl`` has no
  quality label at all (``quality`` skips its 670 replies; ``emoji`` gives 333 desirable, 99 undesirable).
* ``pairs``: no feedback at all: every written preference pair gives its chosen reply as desirable and its
  rejected reply as undesirable (what any pair format gets).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from steps.data.records import DataError

FEEDBACK_RULES = ("quality", "emoji", "pairs")
DEFAULT_FLAGS = ("spam", "fails_task", "lang_mismatch", "pii", "not_appropriate", "hate_speech")
"""OASST's yes/no flags that make a reply unusable as a good answer (``sexual_content``, ``toxicity``, ``violence``,
``humor`` and ``creativity`` describe content a user may have asked for, so they are not flags here)."""
SKIP_REASONS = {
    "quality": ("no_quality_label", "few_quality_votes", "middling_quality"),
    "emoji": ("no_votes", "tied_votes"),
    "pairs": (),
}


class FeedbackRuleError(DataError):
    """A bad ``data.oasst_feedback`` setting; ``field`` names it (the config loader reports the dotted key)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Feedback:
    """One message's feedback: ``labels`` {name: (mean value, votes)}, ``emojis`` {name: count}."""

    labels: dict[str, tuple[float, int]] = field(default_factory=dict)
    emojis: dict[str, int] = field(default_factory=dict)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        return None
    number = float(value)
    return int(number) if number.is_integer() else None


def _value(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _label_items(labels: Any) -> list[tuple[Any, Any, Any]]:
    """(name, value, count) from the flat rows' column layout or the export trees' {name: {value, count}}."""
    if not isinstance(labels, Mapping):
        return []
    names = labels.get("name")
    if isinstance(names, list):  # rows: {"name": [...], "value": [...], "count": [...]}
        values, counts = labels.get("value"), labels.get("count")
        if not isinstance(values, list) or not isinstance(counts, list) or not len(names) == len(values) == len(counts):
            return []
        return list(zip(names, values, counts))
    return [(k, v.get("value"), v.get("count")) for k, v in labels.items() if isinstance(v, Mapping)]


def _emoji_items(emojis: Any) -> list[tuple[Any, Any]]:
    """(name, count) from the rows' {"name": [...], "count": [...]} or the trees' {name: count}."""
    if not isinstance(emojis, Mapping):
        return []
    names = emojis.get("name")
    if isinstance(names, list):
        counts = emojis.get("count")
        return list(zip(names, counts)) if isinstance(counts, list) and len(counts) == len(names) else []
    return list(emojis.items())


def encode_feedback(labels: Any, emojis: Any) -> bytes | None:
    """A message's ``labels`` and ``emojis`` (either OASST layout) as compact JSON, or None when it has none usable.

    Entries that are not (str name, finite value, whole count >= 0) are left out: feedback never drops a message."""
    kept_labels = {}
    for name, value, count in _label_items(labels):
        number, votes = _value(value), _count(count)
        if isinstance(name, str) and number is not None and votes is not None:
            kept_labels[name] = [number, votes]
    kept_emojis = {}
    for name, count in _emoji_items(emojis):
        votes = _count(count)
        if isinstance(name, str) and votes is not None:
            kept_emojis[name] = votes
    if not kept_labels and not kept_emojis:
        return None
    try:
        return json.dumps({"l": kept_labels, "e": kept_emojis}, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a label name with a lone surrogate
        return None


def decode_feedback(data: bytes | None) -> Feedback:
    if not data:
        return Feedback()
    raw = json.loads(data)
    return Feedback({k: (float(v), int(c)) for k, (v, c) in raw["l"].items()}, dict(raw["e"]))


@dataclass(frozen=True)
class OasstFeedbackRule:
    """How OpenAssistant replies become KTO examples (module docstring: the rules and why ``quality`` is default)."""

    rule: Literal["quality", "emoji", "pairs"] = "quality"
    desirable_min_quality: float = 0.75
    undesirable_below_quality: float = 0.5
    min_quality_votes: int = 2
    flags: list[str] = field(default_factory=lambda: list(DEFAULT_FLAGS))
    flag_min_share: float = 0.5
    min_net_votes: int = 1

    def __post_init__(self) -> None:
        if self.rule not in FEEDBACK_RULES:
            raise FeedbackRuleError("rule", f"rule {self.rule!r} is unknown; choose one of {FEEDBACK_RULES}")
        for name in ("desirable_min_quality", "undesirable_below_quality", "flag_min_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
                raise FeedbackRuleError(name, f"{name} = {value!r}: must be a number in [0, 1] (OASST label scale)")
        if self.undesirable_below_quality > self.desirable_min_quality:
            raise FeedbackRuleError(
                "undesirable_below_quality",
                f"undesirable_below_quality ({self.undesirable_below_quality}) is above desirable_min_quality "
                f"({self.desirable_min_quality}): a reply could be both; keep it at or below",
            )
        if self.flag_min_share == 0.0:
            raise FeedbackRuleError("flag_min_share", "flag_min_share = 0 would flag every reply; use a share > 0")
        for name in ("min_quality_votes", "min_net_votes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FeedbackRuleError(name, f"{name} = {value!r}: must be a whole number >= 1")
        if not isinstance(self.flags, (list, tuple)) or not all(isinstance(f, str) for f in self.flags):
            raise FeedbackRuleError("flags", f"flags = {self.flags!r}: must be a list of OASST label names")

    @classmethod
    def of(cls, value: Any) -> OasstFeedbackRule:
        """The rule from a config value: an instance, a mapping of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise FeedbackRuleError(
                    unknown[0], f"unknown key(s) {unknown}; allowed: {', '.join(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        raise FeedbackRuleError("rule", f"expected a mapping of {cls.__name__} fields, got {value!r:.80}")

    def describe(self) -> dict[str, Any]:
        """The settings that matter for this rule (stats.json ``kto.rule``)."""
        keys = {
            "quality": (
                "desirable_min_quality",
                "undesirable_below_quality",
                "min_quality_votes",
                "flags",
                "flag_min_share",
            ),
            "emoji": ("min_net_votes",),
            "pairs": (),
        }[self.rule]
        return {"rule": self.rule, **{k: getattr(self, k) for k in keys}}

    def label(self, feedback: Feedback) -> tuple[bool | None, str, dict[str, Any]]:
        """(True desirable / False undesirable / None skipped, why, the evidence used) for one reply."""
        if self.rule == "quality":
            return self._by_quality(feedback)
        if self.rule == "emoji":
            return self._by_emoji(feedback)
        raise ValueError("the pairs rule labels written pairs, not single replies")

    def _by_quality(self, feedback: Feedback) -> tuple[bool | None, str, dict[str, Any]]:
        flagged = sorted(
            name
            for name in self.flags
            if name in feedback.labels
            and feedback.labels[name][1] > 0
            and feedback.labels[name][0] >= self.flag_min_share
        )
        quality, votes = feedback.labels.get("quality", (math.nan, 0))
        evidence: dict[str, Any] = {"quality": None if votes == 0 else quality, "quality_votes": votes}
        if flagged:
            return False, "flagged", {**evidence, "flags": flagged}
        if votes == 0:
            return None, "no_quality_label", evidence
        if votes < self.min_quality_votes:
            return None, "few_quality_votes", evidence
        if quality >= self.desirable_min_quality:
            return True, "high_quality", evidence
        if quality < self.undesirable_below_quality:
            return False, "low_quality", evidence
        return None, "middling_quality", evidence

    def _by_emoji(self, feedback: Feedback) -> tuple[bool | None, str, dict[str, Any]]:
        up, down, red = (feedback.emojis.get(k, 0) for k in ("+1", "-1", "red_flag"))
        evidence = {"+1": up, "-1": down, "red_flag": red}
        if red:
            return False, "red_flag", evidence
        net = up - down
        if net >= self.min_net_votes:
            return True, "net_up_votes", evidence
        if net <= -self.min_net_votes:
            return False, "net_down_votes", evidence
        return None, ("no_votes" if up == down == 0 else "tied_votes"), evidence
