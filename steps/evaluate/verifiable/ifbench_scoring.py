"""Scoring responses with IFBench's verifiers: one verdict per instruction, strict and loose.

Each instruction is checked by the package's own functions (``evaluation_lib.test_instruction_following_strict``
and ``..._loose``) on a one-instruction example, so a verifier that cannot run (NLTK data missing offline) costs
that instruction only: it is recorded as unscored with its reason, never guessed. Loose is the package's rule:
the response also tried with its first line, last line or both removed, each with and without ``*``.
Arguments whose value is None are dropped before a verifier is built, as the package's own run does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steps.evaluate.verifiable.ifbench_prompts import IFBenchInputError, IFBenchPrompt
from steps.evaluate.verifiable.offline_verifiers import (
    IFBenchVerifiers,
    InterceptedDownloads,
    nltk_downloads_intercepted,
)

logger = logging.getLogger(__name__)

MODES = ("strict", "loose")
#: "Resource 'stopwords' not found" (nltk 3.10) or the name in ANSI colour codes (older nltk)
_NLTK_RESOURCE = re.compile(r"Resource\s+(?:\x1b\[[0-9;]*m|')?([\w./-]+)")


@dataclass(frozen=True)
class Verdict:
    """Whether one instruction was followed; ``followed`` is None when it could not be scored (``reason`` says why)."""

    followed: bool | None
    reason: str | None = None


@dataclass(frozen=True)
class PromptResult:
    """One prompt's verdicts, in instruction order, under both modes."""

    key: str
    instruction_ids: tuple[str, ...]
    strict: tuple[Verdict, ...]
    loose: tuple[Verdict, ...]

    def verdicts(self, mode: str) -> tuple[Verdict, ...]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return self.strict if mode == "strict" else self.loose

    def followed_all(self, mode: str) -> bool | None:
        """The prompt-level result: every instruction followed; None when any instruction is unscored."""
        verdicts = self.verdicts(mode)
        if any(v.followed is None for v in verdicts):
            return None
        return all(v.followed for v in verdicts)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready: per mode, the package's ``follow_instruction_list`` (None = unscored) and the reasons."""
        record: dict[str, Any] = {"key": self.key, "instruction_id_list": list(self.instruction_ids)}
        for mode in MODES:
            verdicts = self.verdicts(mode)
            record[mode] = {
                "follow_all_instructions": self.followed_all(mode),
                "follow_instruction_list": [v.followed for v in verdicts],
                "unscored_reasons": [v.reason for v in verdicts],
            }
        return record


def prompt_result_from_record(record: Any, where: str = "IFBench result") -> PromptResult:
    """Read back :meth:`PromptResult.to_record` (results stored by an earlier run, e.g. a baseline's)."""
    try:
        ids = tuple(record["instruction_id_list"])
        modes = {}
        for mode in MODES:
            followed, reasons = record[mode]["follow_instruction_list"], record[mode]["unscored_reasons"]
            if len(followed) != len(ids) or len(reasons) != len(ids):
                raise ValueError(f"{mode} lists do not have one entry per instruction")
            if not all(f is None or isinstance(f, bool) for f in followed):
                raise ValueError(f"{mode} follow_instruction_list holds something other than true/false/null")
            modes[mode] = tuple(Verdict(f, r) for f, r in zip(followed, reasons))
        return PromptResult(str(record["key"]), ids, modes["strict"], modes["loose"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IFBenchInputError(
            f"{where}: not an IFBench per-prompt result ({exc!r}); expected the records score_ifbench writes"
        ) from exc


def _unscored(exc: Exception) -> Verdict:
    if isinstance(exc, LookupError):
        found = _NLTK_RESOURCE.search(str(exc))
        return Verdict(None, f"missing NLTK data {found.group(1) if found else '(unnamed resource)'}")
    logger.warning("an IFBench verifier raised %s: %s", type(exc).__name__, exc)
    return Verdict(None, f"verifier raised {type(exc).__name__}")


def _check_instruction(
    verifiers: IFBenchVerifiers, prompt: IFBenchPrompt, index: int, response: str
) -> tuple[Verdict, Verdict]:
    """(strict, loose) verdicts of instruction ``index`` of ``prompt`` on ``response``."""
    lib = verifiers.evaluation_lib
    kwargs = {k: v for k, v in prompt.kwargs[index].items() if v is not None}
    verdicts = []
    for check in (lib.test_instruction_following_strict, lib.test_instruction_following_loose):
        example = lib.InputExample(
            key=prompt.key,
            instruction_id_list=[prompt.instruction_ids[index]],
            prompt=prompt.prompt,
            kwargs=[dict(kwargs)],
        )
        try:
            outcome = check(example, {prompt.prompt: response})
        except Exception as exc:  # the package's own run would stop here; one instruction is lost instead
            verdicts.append(_unscored(exc))
            continue
        verdicts.append(Verdict(bool(outcome.follow_instruction_list[0])))
    return verdicts[0], verdicts[1]


def score_prompts(
    verifiers: IFBenchVerifiers,
    prompts: Sequence[IFBenchPrompt],
    responses: Mapping[str, str],
    downloads: InterceptedDownloads | None = None,
) -> list[PromptResult]:
    """Score ``responses`` (prompt key -> response text) on ``prompts``; NLTK downloads intercepted throughout.

    ``downloads`` collects what the verifiers asked NLTK to download (nothing is fetched).
    """
    from tqdm.auto import tqdm

    unknown = sorted({i for p in prompts for i in p.instruction_ids} - set(verifiers.registry))
    if unknown:
        raise IFBenchInputError(f"instruction ids {unknown} have no verifier in {verifiers.package_dir}")
    results = []
    with nltk_downloads_intercepted(downloads or InterceptedDownloads()):
        for prompt in tqdm(prompts, desc="IFBench verifiers", unit="prompt"):
            pairs = [_check_instruction(verifiers, prompt, i, responses[prompt.key]) for i in range(len(prompt.kwargs))]
            results.append(
                PromptResult(
                    prompt.key, prompt.instruction_ids, tuple(s for s, _ in pairs), tuple(lo for _, lo in pairs)
                )
            )
    return results
