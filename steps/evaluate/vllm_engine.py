"""vLLM as PrefFlow runs it: one engine seed (a seed on every request forces vLLM's slower per-request sampling
path), a ``max_model_len`` sized to the eval set rather than the model's own limit (Llama 3.1's 131072 would have
vLLM plan for a 131072-token sequence), and a bounded share of the GPU.

Everything here but :func:`vllm_token_ids` runs without vLLM: the arguments are built (and tested) in the parent
process; the engine itself runs in the generation subprocess (steps/evaluate/generation_worker.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from steps.evaluate.settings import EngineSettings, GenerationError, GenerationSettings

logger = logging.getLogger(__name__)

#: ``max_model_len`` is rounded up to a multiple of this many tokens (a readable number; 16 vLLM KV blocks).
MAX_MODEL_LEN_MULTIPLE = 256

#: vLLM's own ``auto`` picks float16 for the float32 exports (overflow-prone); PrefFlow's ``auto`` is bfloat16.
VLLM_AUTO_DTYPE = "bfloat16"

#: Scheduling in the calling process: with the engine seed the same inputs give the same answers (vLLM's
#: reproducibility guide); a value already in the environment wins.
DETERMINISTIC_SCHEDULING = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def vllm_dtype(dtype: str) -> str:
    """The dtype vLLM is asked for: ``auto`` -> bfloat16, other names unchanged."""
    return VLLM_AUTO_DTYPE if str(dtype).lower() == "auto" else str(dtype)


def model_position_limit(location: str) -> int | None:
    """The model's ``max_position_embeddings`` (its text config's, for composite configs); None when it has none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def engine_max_model_len(
    prompt_lengths: Sequence[int], max_new_tokens: int, position_limit: int | None, requested: int | None = None
) -> int:
    """The ``max_model_len`` vLLM gets: ``requested`` when set, else the longest prompt plus ``max_new_tokens``
    rounded up to :data:`MAX_MODEL_LEN_MULTIPLE`; never above the model's ``position_limit``.

    A prompt that leaves no room for one answer token fails here, naming the setting to change; answers that the
    limit cuts short are logged."""
    if not prompt_lengths:
        raise GenerationError("no prompts to size max_model_len for", "instructions")
    longest = max(prompt_lengths)
    if requested is not None:
        if requested <= longest:
            raise GenerationError(
                f"evaluation.max_model_len is {requested} but the longest prompt has {longest} tokens, leaving no "
                "room for an answer; raise it or set it to null (computed from the eval set)",
                "max_model_len",
            )
        length = requested
    else:
        length = -(-(longest + max_new_tokens) // MAX_MODEL_LEN_MULTIPLE) * MAX_MODEL_LEN_MULTIPLE
    if position_limit is not None:
        if longest >= position_limit:
            raise GenerationError(
                f"the longest prompt has {longest} tokens, at least the model's max_position_embeddings "
                f"({position_limit}): no answer fits; shorten the eval set's instructions",
                "instructions",
            )
        length = min(length, position_limit)
    if longest + max_new_tokens > length:
        logger.warning(
            "max_model_len %d < longest prompt %d + max_new_tokens %d: the longest prompts' answers stop early",
            length,
            longest,
            max_new_tokens,
        )
    return length


def vllm_engine_args(
    location: str, dtype: str, generation: GenerationSettings, engine: EngineSettings, max_model_len: int
) -> dict[str, Any]:
    """``LLM(...)`` keywords: the one engine seed, the dtype, the sized context and the GPU share."""
    return {
        "model": location,
        "tokenizer": location,
        "seed": generation.seed,
        "dtype": vllm_dtype(dtype),
        "max_model_len": max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
    }


def vllm_sampling_args(generation: GenerationSettings, stops: Sequence[int]) -> dict[str, Any]:
    """``SamplingParams(...)`` keywords, the same for every request: no per-request seed (the engine has one)."""
    return {
        "temperature": generation.temperature if generation.do_sample else 0.0,
        "top_p": generation.top_p if generation.do_sample else 1.0,
        "max_tokens": generation.max_new_tokens,
        "stop_token_ids": [int(token) for token in stops],
    }


def vllm_token_ids(
    engine_args: dict[str, Any], sampling_args: dict[str, Any], prompts: Sequence[Sequence[int]], show_progress: bool
) -> list[list[int]]:
    """Generated token ids per prompt, in order, from one vLLM engine that is gone when this returns.

    Prompts go in as token ids, so vLLM adds no second BOS. Needs vLLM and a GPU: ``benchmarks/gpu_check.py``
    covers this where vLLM is installed; CPU tests run everything around it."""
    for name, value in DETERMINISTIC_SCHEDULING.items():
        os.environ.setdefault(name, value)
    from vllm import LLM, SamplingParams

    logger.info(
        "vLLM: loading %s (%s, max_model_len %d, gpu_memory_utilization %.2f, seed %d)",
        engine_args["model"],
        engine_args["dtype"],
        engine_args["max_model_len"],
        engine_args["gpu_memory_utilization"],
        engine_args["seed"],
    )
    llm = LLM(**engine_args)
    try:
        requests: list[Any] = [{"prompt_token_ids": list(ids)} for ids in prompts]
        results = llm.generate(requests, SamplingParams(**sampling_args), use_tqdm=show_progress)
        return [[int(token) for token in result.outputs[0].token_ids] for result in results]
    finally:
        del llm
