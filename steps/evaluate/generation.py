"""Answer instructions with a model, producing alpaca_eval's ``model_outputs.json`` records.

Prompts use the same chat rendering as training (``steps.chat.render_prompt``) and stop on the same
end-of-turn token. The Hugging Face backend decodes with continuous batching (``steps.evaluate.decoding``): up to
``batch_size`` prompts are in flight, a finished answer leaves the batch at once and the next waiting prompt
(longest prompts first) takes its place, and outputs go back in the caller's order. Greedy output equals decoding
each prompt alone; sampled output is reproducible for a given seed, instruction list and batch size (each prompt
samples from its own generator seeded from ``seed`` and its position). Models the loop cannot handle (no plain
KV cache) fall back to ``model.generate`` on length-sorted, left-padded static batches, batch ``k`` seeded
``seed + k``. A vLLM backend is used instead when vLLM is installed and a GPU is present (``backend="auto"``).
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")


class GenerationError(ValueError):
    """Generation settings or inputs that cannot work (unknown backend, empty instruction, bad numbers)."""


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
        raise GenerationError(f"unknown generation backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise GenerationError("backend='vllm' but vllm is not installed; install vllm or use backend='hf'")
        if _vllm_model_path(model) is None:
            raise GenerationError("backend='vllm' needs a model directory or Hub id, not an in-memory model "
                                  "without a name_or_path on disk")
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
    model: "PreTrainedModel | str",
    tokenizer: "PreTrainedTokenizerBase",
    instructions: Sequence[str],
    *,
    generator: str,
    datasets: Sequence[str | None] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.9,
    top_p: float = 1.0,
    seed: int = 1814,
    do_sample: bool | None = None,
    show_progress: bool = True,
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """One ``{"instruction", "output", "generator"[, "dataset"]}`` record per instruction, in input order.

    ``do_sample`` defaults to ``temperature > 0`` (temperature 0 means greedy). ``model`` may be a loaded
    Hugging Face model or (for vLLM) a path / Hub id.
    """
    instructions = list(instructions)
    for index, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            raise GenerationError(f"instruction {index} must be a non-empty string, got {text!r}")
    if datasets is not None and len(datasets) != len(instructions):
        raise GenerationError(f"datasets has {len(datasets)} entries for {len(instructions)} instructions")
    if batch_size < 1 or max_new_tokens < 1:
        raise GenerationError(f"batch_size and max_new_tokens must be >= 1 (got {batch_size}, {max_new_tokens})")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerationError(f"temperature must be >= 0 and top_p in (0, 1] (got {temperature}, {top_p})")
    if do_sample is None:
        do_sample = temperature > 0
    if do_sample and temperature == 0:
        raise GenerationError("do_sample=True needs temperature > 0")

    chosen = resolve_backend(backend, model)
    started = time.monotonic()
    if chosen == "vllm":
        outputs = _generate_vllm(_vllm_model_path(model), tokenizer, instructions, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed, do_sample=do_sample)
    else:
        if isinstance(model, (str, Path)):
            from steps.models import load_model

            model = load_model(str(model))
        outputs = _generate_hf(model, tokenizer, instructions, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, do_sample=do_sample,
                               show_progress=show_progress)
    elapsed = time.monotonic() - started
    logger.info("generated %d outputs with %s (%s) in %.1f s (%.2f prompts/s)", len(outputs), generator, chosen,
                elapsed, len(outputs) / elapsed if elapsed > 0 else float("inf"))
    records = []
    for index, (instruction, output) in enumerate(zip(instructions, outputs)):
        record: dict[str, Any] = {"instruction": instruction, "output": output, "generator": generator}
        if datasets is not None and datasets[index] is not None:
            record["dataset"] = datasets[index]
        records.append(record)
    return records


def generate_one_at_a_time(model, tokenizer, instructions: Sequence[str], **kwargs) -> list[dict[str, Any]]:
    """The same as :func:`generate_outputs` with batch size 1 (no padding at all)."""
    kwargs["batch_size"] = 1
    return generate_outputs(model, tokenizer, instructions, **kwargs)


def encode_instruction(tokenizer: "PreTrainedTokenizerBase", instruction: str) -> list[int]:
    """Prompt ids for a single-turn user instruction, exactly as training renders prompts."""
    from steps.chat import render_prompt

    text = render_prompt(tokenizer, [{"role": "user", "content": instruction}])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _generate_hf(model, tokenizer, instructions: list[str], *, batch_size: int, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int, do_sample: bool, show_progress: bool) -> list[str]:
    """Continuous batching where the model allows it, else static ``model.generate`` batches."""
    from tqdm.auto import tqdm

    from steps.chat import decode_response
    from steps.evaluate.decoding import supports_continuous_batching

    prompts = [encode_instruction(tokenizer, text) for text in instructions]
    # longest prompts first: prompts admitted together have similar lengths, so their joint prefill pads little
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    was_training = model.training
    model.eval()
    progress = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not show_progress)
    try:
        if supports_continuous_batching(model):
            generated = _decode_continuous(model, tokenizer, prompts, order, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens,
                                           temperature=temperature if do_sample else 0.0, top_p=top_p, seed=seed,
                                           progress=progress)
        else:
            logger.info("%s has no plain KV cache for continuous batching: using model.generate on static batches",
                        type(model).__name__)
            generated = _generate_static(model, tokenizer, prompts, order, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                         seed=seed, do_sample=do_sample, progress=progress)
    finally:
        progress.close()
        model.train(was_training)
    return [decode_response(tokenizer, ids).strip() for ids in generated]


def _pad_id(tokenizer) -> int:
    """Filler for left padding (always masked out): the pad token, else eos, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _decode_continuous(model, tokenizer, prompts: list[list[int]], order: list[int], *, batch_size: int,
                       max_new_tokens: int, temperature: float, top_p: float, seed: int, progress) -> list[list[int]]:
    """Generated ids per prompt from :class:`~steps.evaluate.decoding.ContinuousBatchDecoder` (temperature 0 =
    greedy), one progress tick per finished answer, and a log line saying what the loop did."""
    from steps.chat import stop_token_ids
    from steps.evaluate.decoding import ContinuousBatchDecoder, DecodeSettings, unapplied_generation_settings

    ignored = unapplied_generation_settings(model)
    if ignored:
        logger.warning("the model's generation_config sets %s; continuous batching does not apply them (only "
                       "temperature, top_p, max_new_tokens and the stop tokens count, as with vLLM)", ignored)
    settings = DecodeSettings(batch_size=batch_size, max_new_tokens=max_new_tokens,
                              stop_ids=tuple(stop_token_ids(tokenizer)), pad_id=_pad_id(tokenizer),
                              temperature=temperature, top_p=top_p, seed=seed)
    decoder = ContinuousBatchDecoder(model, settings)
    generated, stats = decoder.run(prompts, order, on_finished=lambda _index: progress.update(1))
    logger.info("continuous batching (batch %d, %s): %d prompts, %d prefill calls (%d prompt tokens), "
                "%d decode steps with %.2f rows on average, %d tokens generated, widest cache %d columns; "
                "%.1f s prefilling, %.1f s decoding",
                batch_size, "greedy" if temperature == 0 else f"sampling T={temperature} top_p={top_p}",
                stats.prompts, stats.prefill_calls, stats.prefill_tokens, stats.decode_steps,
                stats.mean_active_rows, stats.generated_tokens, stats.widest_cache, stats.prefill_s, stats.decode_s)
    return generated


def _generate_static(model, tokenizer, prompts: list[list[int]], order: list[int], *, batch_size: int,
                     max_new_tokens: int, temperature: float, top_p: float, seed: int, do_sample: bool,
                     progress) -> list[list[int]]:
    """``model.generate`` on left-padded batches of ``batch_size`` consecutive prompts in ``order``."""
    import torch

    from steps.chat import stop_token_ids
    from steps.evaluate.decoding import left_pad

    pad_id = _pad_id(tokenizer)
    stops = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    generated: list[list[int]] = [[] for _ in prompts]
    for batch_index, start in enumerate(range(0, len(order), batch_size)):
        members = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in members], pad_id)
        width = input_ids.shape[1]
        torch.manual_seed(seed + batch_index)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                                    use_cache=True, **sampling)
        for row, i in enumerate(members):
            generated[i] = output[row, width:].tolist()
        progress.update(len(members))
    return generated


def _generate_vllm(model_path: str, tokenizer, instructions: list[str], *, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int, do_sample: bool) -> list[str]:
    """vLLM on the same prompt ids (passed as token ids so no second BOS is added) and the same stop tokens."""
    from vllm import LLM, SamplingParams

    from steps.chat import stop_token_ids

    prompts = [{"prompt_token_ids": encode_instruction(tokenizer, text)} for text in instructions]
    params = SamplingParams(
        temperature=temperature if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0,
        max_tokens=max_new_tokens,
        seed=seed,
        stop_token_ids=stop_token_ids(tokenizer),
    )
    logger.info("vLLM: loading %s", model_path)
    llm = LLM(model=model_path, tokenizer=model_path, seed=seed)
    try:
        results = llm.generate(prompts, params)
    finally:
        del llm
    return [result.outputs[0].text.strip() for result in results]
