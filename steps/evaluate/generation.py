"""Answer instructions with a model, producing alpaca_eval's ``model_outputs.json`` records, with the chat
rendering and end-of-turn token of training; Hugging Face (continuous batching, else ``model.generate``) or vLLM."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from steps.chat import decode_response, render_prompt, stop_token_ids
from steps.evaluate.settings import GenerationError, GenerationSettings
from steps.models import load_model, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from steps.evaluate.eval_sets import EvalSet

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "GenerationError",
    "GenerationSettings",
    "ModelRun",
    "answer_eval_set",
    "encode_instruction",
    "generate_outputs",
    "resolve_backend",
    "resolve_device",
    "vllm_available",
]

BACKENDS = ("auto", "hf", "vllm")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def vllm_available() -> bool:
    """vLLM importable and a CUDA GPU present."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str, model: Any) -> str:
    """``auto`` -> ``vllm`` when usable for this model (a GPU, vLLM, a model path), else ``hf``."""
    if backend not in BACKENDS:
        raise GenerationError(f"unknown generation backend {backend!r}; use one of {', '.join(BACKENDS)}", "backend")
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise GenerationError(
                "backend='vllm' but vllm is not installed; install vllm or use backend='hf'", "backend"
            )
        if _vllm_model_path(model) is None:
            raise GenerationError(
                "backend='vllm' needs a model directory or Hub id, not an in-memory model "
                "without a name_or_path on disk",
                "backend",
            )
        return "vllm"
    if backend == "auto" and vllm_available() and _vllm_model_path(model) is not None:
        return "vllm"
    return "hf"


def _vllm_model_path(model: Any) -> str | None:
    """What vLLM can load: a string path/Hub id, or an HF model's ``name_or_path`` when that is a directory."""
    if isinstance(model, (str, Path)):
        return str(model)
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and Path(name).is_dir() and (Path(name) / "config.json").is_file():
        return str(name)
    return None


def generate_outputs(
    model: PreTrainedModel | str,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    *,
    generator: str,
    generation: GenerationSettings,
    datasets: Sequence[str | None] | None = None,
    backend: str = "auto",
    show_progress: bool = True,
    dtype: str = "auto",
) -> list[dict[str, Any]]:
    """One ``{"instruction", "output", "generator"[, "dataset"]}`` record per instruction, in input order.

    ``model`` may be a loaded Hugging Face model or (for vLLM) a path / Hub id. The HF backend admits the longest
    prompts first and returns outputs in the caller's order: greedy output equals decoding each prompt alone;
    sampled output repeats for a given seed and instruction list (each prompt has its own seeded generator). The
    ``model.generate`` fallback seeds static batch ``k`` with ``seed + k``.
    """
    if not isinstance(generation, GenerationSettings):
        raise GenerationError(f"generation must be a GenerationSettings, got {type(generation).__name__}", "generation")
    instructions = list(instructions)
    for index, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            raise GenerationError(f"instruction {index} must be a non-empty string, got {text!r}", "instructions")
    if datasets is not None and len(datasets) != len(instructions):
        raise GenerationError(f"datasets has {len(datasets)} entries for {len(instructions)} instructions", "datasets")

    chosen = resolve_backend(backend, model)
    vllm_path = _vllm_model_path(model) if chosen == "vllm" else None  # resolve_backend checked there is one
    started = time.monotonic()
    if vllm_path is not None:
        outputs = _generate_vllm(vllm_path, tokenizer, instructions, generation, dtype)
    else:
        if isinstance(model, (str, Path)):
            model = load_model(str(model))
        outputs = _generate_hf(model, tokenizer, instructions, generation, show_progress=show_progress)
    elapsed = time.monotonic() - started
    logger.info(
        "generated %d outputs with %s (%s) in %.1f s (%.2f prompts/s)",
        len(outputs),
        generator,
        chosen,
        elapsed,
        len(outputs) / elapsed if elapsed > 0 else float("inf"),
    )
    records = []
    for index, (instruction, output) in enumerate(zip(instructions, outputs)):
        record: dict[str, Any] = {"instruction": instruction, "output": output, "generator": generator}
        if datasets is not None and datasets[index] is not None:
            record["dataset"] = datasets[index]
        records.append(record)
    return records


@dataclass(frozen=True)
class ModelRun:
    """How a model answers: backend, device and dtype, and the model and tokenizer when already loaded (else the
    spec is loaded). Make one per call: it holds the model, which must be freed before a judge model loads."""

    backend: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    model: Any = None
    tokenizer: Any = None
    show_progress: bool = True


def answer_eval_set(
    model_spec: str, eval_set: EvalSet, generator: str, generation: GenerationSettings, run: ModelRun = ModelRun()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Outputs for every instruction of the eval set (loading ``model_spec`` unless ``run.model`` is given), and
    how they were made (backend, seconds, prompts per second)."""
    tokenizer = run.tokenizer if run.tokenizer is not None else load_tokenizer(model_spec)
    chosen = resolve_backend(run.backend, run.model if run.model is not None else model_spec)
    model = run.model
    if model is None:
        model = (
            model_spec
            if chosen == "vllm"
            else load_model(model_spec, dtype=run.dtype, device=resolve_device(run.device))
        )
    started = time.monotonic()
    records = generate_outputs(
        model,
        tokenizer,
        eval_set.instructions,
        generator=generator,
        generation=generation,
        datasets=[r.get("dataset") for r in eval_set.records],
        backend=chosen,
        show_progress=run.show_progress,
        dtype=run.dtype,
    )
    elapsed = time.monotonic() - started
    info = {"backend": chosen, "seconds": elapsed, "prompts_per_second": len(records) / elapsed if elapsed else None}
    return records, info


def encode_instruction(tokenizer: PreTrainedTokenizerBase, instruction: str) -> list[int]:
    """Prompt ids for a single-turn user instruction, exactly as training renders prompts."""
    text = render_prompt(tokenizer, [{"role": "user", "content": instruction}])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class _Prompts:
    """Prompt token ids to answer, the order to admit them in, the ids that end an answer and the pad id."""

    ids: list[list[int]]
    order: list[int]
    stops: tuple[int, ...]
    pad_id: int


def _generate_hf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    instructions: list[str],
    generation: GenerationSettings,
    *,
    show_progress: bool,
) -> list[str]:
    """Continuous batching where the model allows it, else static ``model.generate`` batches."""
    from steps.evaluate.decoding import supports_continuous_batching

    ids = [encode_instruction(tokenizer, text) for text in instructions]
    # longest prompts first: prompts admitted together have similar lengths, so their joint prefill pads little
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    prompts = _Prompts(ids, order, tuple(stop_token_ids(tokenizer)), _pad_id(tokenizer))
    was_training = model.training
    model.eval()
    progress = tqdm(total=len(ids), desc="generate", unit="prompt", disable=not show_progress)
    try:
        if supports_continuous_batching(model):
            generated = _decode_continuous(model, prompts, generation, progress)
        else:
            logger.info(
                "%s has no plain KV cache for continuous batching: using model.generate on static batches",
                type(model).__name__,
            )
            generated = _generate_static(model, prompts, generation, progress)
    finally:
        progress.close()
        model.train(was_training)
    return [decode_response(tokenizer, ids).strip() for ids in generated]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Filler for left padding (always masked out): the pad token, else eos, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _decode_continuous(
    model: PreTrainedModel, prompts: _Prompts, generation: GenerationSettings, progress: tqdm
) -> list[list[int]]:
    """Generated ids per prompt from :class:`~steps.evaluate.decoding.ContinuousBatchDecoder`, one progress tick
    per finished answer, and a log line saying what the loop did."""
    from steps.evaluate.decoding import ContinuousBatchDecoder, unapplied_generation_settings

    ignored = unapplied_generation_settings(model)
    if ignored:
        logger.warning(
            "the model's generation_config sets %s; continuous batching does not apply them (only "
            "temperature, top_p, max_new_tokens and the stop tokens count, as with vLLM)",
            ignored,
        )
    decoder = ContinuousBatchDecoder(model, generation, stop_ids=prompts.stops, pad_id=prompts.pad_id)
    generated, stats = decoder.run(prompts.ids, prompts.order, on_finished=lambda _index: progress.update(1))
    sampling = f"sampling T={generation.temperature} top_p={generation.top_p}" if generation.do_sample else "greedy"
    logger.info(
        "continuous batching (batch %d, %s): %d prompts, %d prefill calls (%d prompt tokens), "
        "%d decode steps with %.2f rows on average, %d tokens generated, widest cache %d columns; "
        "%.1f s prefilling, %.1f s decoding",
        generation.batch_size,
        sampling,
        stats.prompts,
        stats.prefill_calls,
        stats.prefill_tokens,
        stats.decode_steps,
        stats.mean_active_rows,
        stats.generated_tokens,
        stats.widest_cache,
        stats.prefill_s,
        stats.decode_s,
    )
    return generated


def _generate_static(model: Any, prompts: _Prompts, generation: GenerationSettings, progress: tqdm) -> list[list[int]]:
    """``model.generate`` on left-padded batches of ``batch_size`` consecutive prompts in ``order``.

    ``model`` is anything with ``generate`` (``PreTrainedModel`` itself does not declare it: ``GenerationMixin`` does).
    """
    import torch

    from steps.evaluate.kv_cache import left_pad

    device = next(model.parameters()).device
    sampling = (
        {"do_sample": True, "temperature": generation.temperature, "top_p": generation.top_p}
        if generation.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    generated: list[list[int]] = [[] for _ in prompts.ids]
    for batch_index, start in enumerate(range(0, len(prompts.order), generation.batch_size)):
        members = prompts.order[start : start + generation.batch_size]
        input_ids, attention_mask = left_pad([prompts.ids[i] for i in members], prompts.pad_id)
        width = input_ids.shape[1]
        torch.manual_seed(generation.seed + batch_index)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=generation.max_new_tokens,
                eos_token_id=list(prompts.stops),
                pad_token_id=prompts.pad_id,
                use_cache=True,
                **sampling,
            )
        for row, i in enumerate(members):
            generated[i] = output[row, width:].tolist()
        progress.update(len(members))
    return generated


def _generate_vllm(
    model_path: str, tokenizer: Any, instructions: list[str], generation: GenerationSettings, dtype: str = "auto"
) -> list[str]:
    """vLLM on the same prompt ids (passed as token ids so no second BOS is added) and the same stop tokens.

    ``auto`` is bf16: the exported models are fp32, for which vLLM's own ``auto`` picks fp16 (overflow-prone)."""
    from vllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": encode_instruction(tokenizer, text)} for text in instructions]
    params = SamplingParams(
        temperature=generation.temperature if generation.do_sample else 0.0,
        top_p=generation.top_p if generation.do_sample else 1.0,
        max_tokens=generation.max_new_tokens,
        seed=generation.seed,
        stop_token_ids=stop_token_ids(tokenizer),
    )
    logger.info("vLLM: loading %s", model_path)
    llm = LLM(
        model=model_path, tokenizer=model_path, seed=generation.seed, dtype="bfloat16" if dtype == "auto" else dtype
    )
    try:
        results = llm.generate(prompts, params)
    finally:
        del llm
    return [result.outputs[0].text.strip() for result in results]
