"""Phase 1 of a round: ``samples_per_prompt`` answers per prompt from the current policy, through the evaluation
generator (HF continuous batching or vLLM), written once and reused by a retried round with the same inputs."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.evaluate.decoding import row_seed
from steps.evaluate.generation import ModelRun, answer_instructions, encode_instruction
from steps.evaluate.settings import GenerationSettings
from steps.io import atomic_write_files, jsonl_line, read_json, read_jsonl
from steps.onpolicy.prompts import OnPolicyError, RoundPrompt

if TYPE_CHECKING:
    from steps.onpolicy.config import OnPolicyConfig

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SAMPLES_META_FILE = "samples.json"
#: vLLM hands its engine seed to numpy, which takes seeds below 2**32.
SEED_RANGE = 2**31


def round_seed(seed: int, round_index: int) -> int:
    """The generation seed of round ``round_index``: mixed from the run seed, so rounds draw different answers."""
    return row_seed(seed, round_index) % SEED_RANGE


def round_generation(cfg: OnPolicyConfig, round_index: int) -> GenerationSettings:
    """The sampling settings of a round. Answers are requested sample-major (sample 0 of every prompt, then sample
    1, ...): the HF decoder seeds row ``s * n_prompts + i`` with ``row_seed(round seed, row)``, so each (seed,
    round, sample, prompt) has its own seed and a round with more samples extends one with fewer; vLLM draws them
    from its one engine seed, the round seed."""
    return GenerationSettings(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=round_seed(cfg.seed, round_index),
        batch_size=cfg.batch_size,
    )


@dataclass(frozen=True)
class SampleSet:
    """A round's answers, one row per (sample, prompt), and how they were made (``meta``: inputs, fingerprint,
    token counts, seconds, the generator's record)."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    reused: bool = False


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``inputs``: equal fingerprints mean equal inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_samples(round_dir: str | Path) -> SampleSet:
    """The round's samples as written by :func:`sample_round`; an error naming the file if they are missing or do
    not match their record (a write cut short)."""
    round_dir = Path(round_dir)
    meta_path, rows_path = round_dir / SAMPLES_META_FILE, round_dir / SAMPLES_FILE
    if not meta_path.is_file() or not rows_path.is_file():
        raise OnPolicyError(f"{round_dir}: no {SAMPLES_FILE} with its {SAMPLES_META_FILE}; run sample_round first")
    meta = read_json(meta_path)
    data = rows_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("samples_sha256"):
        raise OnPolicyError(
            f"{rows_path}: content does not match {meta_path} (samples_sha256); delete both and sample again"
        )
    return SampleSet(read_jsonl(rows_path), meta, reused=True)


def _reusable(round_dir: Path, wanted: str) -> SampleSet | None:
    try:
        found = read_samples(round_dir)
    except (OnPolicyError, OSError, ValueError):
        return None
    return found if found.meta.get("fingerprint") == wanted else None


def sample_round(
    policy: str,
    prompts: Sequence[RoundPrompt],
    cfg: OnPolicyConfig,
    round_index: int,
    out_dir: str | Path,
    run: ModelRun = ModelRun(),
) -> SampleSet:
    """Answer every prompt ``cfg.samples_per_prompt`` times with ``policy`` (a model spec or directory; or the
    model in ``run.model``) and write ``out_dir/samples.jsonl`` + ``samples.json`` together, atomically.

    Rows: ``prompt_id``, ``prompt_index``, ``sample``, ``instruction``, ``output``, ``prompt_tokens`` and
    ``answer_tokens`` (the answer as training encodes it, end-of-turn token included), and ``usable`` (false when
    the answer's text holds the end-of-turn token, which training refuses). If ``out_dir`` already holds samples
    of the same policy, prompts, round and settings, they are returned (``reused``) and nothing is generated.
    """
    if not prompts:
        raise OnPolicyError(f"round {round_index}: no prompts to sample")
    out_dir = Path(out_dir)
    generation = round_generation(cfg, round_index)
    k = cfg.samples_per_prompt
    inputs = {
        "policy": str(policy),
        "round": round_index,
        "samples_per_prompt": k,
        "prompts": [[p.prompt_id, p.instruction] for p in prompts],
        "generation": generation.record(),
    }
    wanted = fingerprint(inputs)
    found = _reusable(out_dir, wanted)
    if found is not None:
        logger.info("round %d: reusing %d samples from %s (same inputs)", round_index, len(found.rows), out_dir)
        return found
    from steps.models import load_tokenizer

    tokenizer = run.tokenizer if run.tokenizer is not None else load_tokenizer(str(policy))
    instructions = [p.instruction for _ in range(k) for p in prompts]
    records, info = answer_instructions(
        None if run.model is not None else str(policy),
        instructions,
        f"policy-round-{round_index}",
        generation,
        replace(run, tokenizer=tokenizer),
    )
    rows = _sample_rows(tokenizer, prompts, k, [r["output"] for r in records])
    meta = {
        **{key: value for key, value in inputs.items() if key != "prompts"},
        "fingerprint": wanted,
        "prompts": len(prompts),
        "samples": len(rows),
        "unusable": sum(not r["usable"] for r in rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "answer_tokens": sum(r["answer_tokens"] for r in rows),
        "seconds": info["seconds"],
        "info": info,
    }
    data = b"".join(jsonl_line(row) for row in rows)
    meta["samples_sha256"] = hashlib.sha256(data).hexdigest()
    meta_bytes = (json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    atomic_write_files({out_dir / SAMPLES_FILE: data, out_dir / SAMPLES_META_FILE: meta_bytes})
    logger.info(
        "round %d: wrote %d samples (%d prompts x %d) to %s: %d answer tokens in %.1f s",
        round_index,
        len(rows),
        len(prompts),
        k,
        out_dir / SAMPLES_FILE,
        meta["answer_tokens"],
        info["seconds"],
    )
    return SampleSet(rows, meta)


def _sample_rows(tokenizer: Any, prompts: Sequence[RoundPrompt], k: int, outputs: list[str]) -> list[dict[str, Any]]:
    """Rows in prompt order, samples of a prompt together, with their token counts as training will see them."""
    from steps.chat import end_of_turn_token_id

    end_id = end_of_turn_token_id(tokenizer)
    prompt_tokens = [len(encode_instruction(tokenizer, p.instruction)) for p in prompts]
    rows = []
    for index, prompt in enumerate(prompts):
        for sample in range(k):
            output = outputs[sample * len(prompts) + index]
            body = list(tokenizer(output, add_special_tokens=False)["input_ids"])
            rows.append(
                {
                    "prompt_id": prompt.prompt_id,
                    "prompt_index": index,
                    "sample": sample,
                    "instruction": prompt.instruction,
                    "output": output,
                    "prompt_tokens": prompt_tokens[index],
                    "answer_tokens": len(body) + 1,
                    "usable": end_id not in body,
                }
            )
    return rows
