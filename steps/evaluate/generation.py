"""Answer instructions with a model, producing alpaca_eval's ``model_outputs.json`` records, with the chat
rendering and end-of-turn token of training; Hugging Face (continuous batching, else ``model.generate``) or vLLM.

This process tokenizes the prompts and decodes the answers; the answers' token ids come from the backend here or,
for vLLM by default, from a subprocess (steps/evaluate/generation_worker.py) whose GPU memory is free when it ends."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from steps.chat import decode_response, render_prompt, stop_token_ids
from steps.evaluate.generation_worker import GenerationJob, job_token_ids, run_job_in_subprocess
from steps.evaluate.settings import EngineSettings, GenerationError, GenerationSettings
from steps.evaluate.vllm_engine import (
    engine_max_model_len,
    model_position_limit,
    vllm_dtype,
    vllm_engine_args,
    vllm_sampling_args,
)
from steps.models import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from steps.evaluate.eval_sets import EvalSet

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "EngineSettings",
    "GenerationError",
    "GenerationSettings",
    "ModelRun",
    "answer_eval_set",
    "answer_instructions",
    "encode_instruction",
    "generate_outputs",
    "generation_dtype",
    "generation_job",
    "hf_token_ids",
    "prompt_batch",
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
        if _model_location(model) is None:
            raise GenerationError(
                "backend='vllm' needs a model directory or Hub id, not an in-memory model "
                "without a name_or_path on disk",
                "backend",
            )
        return "vllm"
    if backend == "auto" and vllm_available() and _model_location(model) is not None:
        return "vllm"
    return "hf"


def _model_location(model: Any) -> str | None:
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
) -> list[dict[str, Any]]:
    """One ``{"instruction", "output", "generator"[, "dataset"]}`` record per instruction, in input order.

    ``model`` may be a loaded Hugging Face model or a spec / directory (vLLM: a directory or Hub id; loaded in the
    dtype ``auto`` resolves to: :func:`answer_instructions` with a :class:`ModelRun` picks another). The HF backend
    admits the longest prompts first and returns outputs in the caller's order: greedy output equals decoding each
    prompt alone; sampled output repeats for a given seed and instruction list (each prompt has its own seeded
    generator). The ``model.generate`` fallback seeds static batch ``k`` with ``seed + k``. vLLM runs in a
    subprocess with one engine seed (see :func:`answer_instructions` for the engine settings).
    """
    loaded = not isinstance(model, (str, Path))
    run = ModelRun(
        backend, dtype="auto", model=model if loaded else None, tokenizer=tokenizer, show_progress=show_progress
    )
    records, _ = answer_instructions(
        None if loaded else str(model), instructions, generator, generation, run, datasets=datasets
    )
    return records


@dataclass(frozen=True)
class ModelRun:
    """How a model answers: backend, device and dtype, the model and tokenizer when already loaded (else the spec
    is loaded), and the engine settings (vLLM's GPU share and context, which process generates). Make one per call:
    it holds the model, which must be freed before a judge model loads."""

    backend: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    model: Any = None
    tokenizer: Any = None
    show_progress: bool = True
    engine: EngineSettings = field(default_factory=EngineSettings)


def answer_eval_set(
    model_spec: str, eval_set: EvalSet, generator: str, generation: GenerationSettings, run: ModelRun = ModelRun()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Outputs for every instruction of the eval set (loading ``model_spec`` unless ``run.model`` is given), and
    how they were made (backend, dtype, process, seconds, prompts per second; vLLM's engine settings)."""
    datasets = [r.get("dataset") for r in eval_set.records]
    return answer_instructions(model_spec, eval_set.instructions, generator, generation, run, datasets=datasets)


def answer_instructions(
    model_spec: str | None,
    instructions: Sequence[str],
    generator: str,
    generation: GenerationSettings,
    run: ModelRun,
    datasets: Sequence[str | None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records for ``instructions`` and how they were made. The parent tokenizes and decodes; the answers' token
    ids come from vLLM or the HF decoder, in this process or (``run.engine.in_subprocess``) in a child process."""
    if not isinstance(generation, GenerationSettings):
        raise GenerationError(f"generation must be a GenerationSettings, got {type(generation).__name__}", "generation")
    instructions = list(instructions)
    for index, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            raise GenerationError(f"instruction {index} must be a non-empty string, got {text!r}", "instructions")
    if datasets is not None and len(datasets) != len(instructions):
        raise GenerationError(f"datasets has {len(datasets)} entries for {len(instructions)} instructions", "datasets")
    if model_spec is None and run.model is None:
        raise GenerationError("give a model spec or a loaded model (ModelRun.model)", "model")
    tokenizer = run.tokenizer if run.tokenizer is not None else load_tokenizer(str(model_spec))
    chosen = resolve_backend(run.backend, run.model if run.model is not None else model_spec)
    prompts = prompt_batch(
        [encode_instruction(tokenizer, text) for text in instructions], stop_token_ids(tokenizer), _pad_id(tokenizer)
    )
    started = time.monotonic()
    token_ids, info = _answer_token_ids(model_spec, chosen, prompts, generation, run)
    elapsed = time.monotonic() - started
    outputs = [decode_response(tokenizer, ids).strip() for ids in token_ids]
    info = {
        "backend": chosen,
        "dtype": generation_dtype(run, chosen),
        **info,
        "seconds": elapsed,
        "prompts_per_second": len(outputs) / elapsed if elapsed else None,
    }
    logger.info(
        "generated %d outputs with %s (%s, %s, %s) in %.1f s (%.2f prompts/s)",
        len(outputs),
        generator,
        chosen,
        info["dtype"],
        info["process"],
        elapsed,
        info["prompts_per_second"] or float("inf"),
    )
    records = []
    for index, (instruction, output) in enumerate(zip(instructions, outputs)):
        record: dict[str, Any] = {"instruction": instruction, "output": output, "generator": generator}
        if datasets is not None and datasets[index] is not None:
            record["dataset"] = datasets[index]
        records.append(record)
    return records, info


def generation_dtype(run: ModelRun, backend: str) -> str:
    """The dtype the answers are computed in: a loaded model's own, vLLM's (``auto`` = bfloat16), or what
    ``load_model`` resolves ``run.dtype`` to on ``run.device`` (``auto``: bfloat16 on a CUDA GPU, else float32)."""
    from steps.models.load import resolve_dtype, torch_dtype

    if run.model is not None and backend == "hf":
        return str(next(run.model.parameters()).dtype).removeprefix("torch.")
    if backend == "vllm":
        return vllm_dtype(run.dtype)
    return str(torch_dtype(resolve_dtype(run.dtype, resolve_device(run.device)))).removeprefix("torch.")


def _answer_token_ids(
    model_spec: str | None, backend: str, prompts: _Prompts, generation: GenerationSettings, run: ModelRun
) -> tuple[list[list[int]], dict[str, Any]]:
    """Generated ids per prompt, on ``backend``, here or in a subprocess as ``run.engine`` says."""
    in_child = run.engine.in_subprocess(backend)
    if backend == "hf" and run.model is not None and not in_child:
        ids = hf_token_ids(run.model, prompts, generation, show_progress=run.show_progress)
        return ids, {"process": "in_process"}
    job, info = generation_job(model_spec, backend, prompts, generation, run)
    if in_child:
        ids, ran = run_job_in_subprocess(job, run.engine.timeout_s)
        return ids, {**info, **ran}
    return job_token_ids(job), {**info, "process": "in_process"}


def generation_job(
    model_spec: str | None, backend: str, prompts: _Prompts, generation: GenerationSettings, run: ModelRun
) -> tuple[GenerationJob, dict[str, Any]]:
    """The token-level job for ``backend`` (vLLM: with its engine and sampling keywords, ``max_model_len`` sized
    to these prompts) and what the generation record keeps of the engine settings."""
    if backend == "vllm":
        location = _model_location(run.model if run.model is not None else model_spec)
    elif run.model is not None:
        raise GenerationError(
            "generation_process subprocess loads the model from its spec in the child: pass the model spec, not "
            "a loaded model (or use generation_process in_process)",
            "generation_process",
        )
    else:
        location = model_spec
    job = GenerationJob(
        backend=backend,
        model=str(location),
        prompts=prompts.ids,
        stops=list(prompts.stops),
        pad_id=prompts.pad_id,
        generation=asdict(generation),
        device=run.device,
        dtype=run.dtype,
        show_progress=run.show_progress,
    )
    if backend != "vllm":
        return job, {}
    engine = run.engine
    position_limit = model_position_limit(job.model)
    max_model_len = engine_max_model_len(
        [len(ids) for ids in job.prompts], generation.max_new_tokens, position_limit, engine.max_model_len
    )
    engine_args = vllm_engine_args(job.model, job.dtype, generation, engine, max_model_len)
    info = {
        "max_model_len": max_model_len,
        "model_max_position_embeddings": position_limit,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "engine_seed": engine_args["seed"],
    }
    return replace(job, vllm_engine=engine_args, vllm_sampling=vllm_sampling_args(generation, job.stops)), info


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


def prompt_batch(ids: Sequence[Sequence[int]], stops: Sequence[int], pad_id: int) -> _Prompts:
    """Prompts with their admission order: longest first, so prompts admitted together have similar lengths and
    their joint prefill pads little."""
    prompts = [[int(token) for token in prompt] for prompt in ids]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    return _Prompts(prompts, order, tuple(int(token) for token in stops), int(pad_id))


def hf_token_ids(
    model: PreTrainedModel, prompts: _Prompts, generation: GenerationSettings, *, show_progress: bool
) -> list[list[int]]:
    """Generated ids per prompt: continuous batching where the model allows it, else static ``model.generate``
    batches."""
    from steps.evaluate.decoding import supports_continuous_batching

    was_training = model.training
    model.eval()
    progress = tqdm(total=len(prompts.ids), desc="generate", unit="prompt", disable=not show_progress)
    try:
        if supports_continuous_batching(model):
            return _decode_continuous(model, prompts, generation, progress)
        logger.info(
            "%s has no plain KV cache for continuous batching: using model.generate on static batches",
            type(model).__name__,
        )
        return _generate_static(model, prompts, generation, progress)
    finally:
        progress.close()
        model.train(was_training)


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
