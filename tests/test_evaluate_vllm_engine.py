"""The vLLM path up to the engine, without vLLM (not installed here, and no GPU): the job the parent builds for the
generation subprocess -- one engine seed and none per request, max_model_len from the eval set's longest prompt
and max_new_tokens, capped by the model's max_position_embeddings, the GPU share -- checked against values
computed here from the real tokenizer's chat template and the model's config.json. vLLM itself is exercised by
benchmarks/gpu_check.py where it is installed."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict

import pytest

from steps.chat import stop_token_ids
from steps.evaluate.eval_sets import load_eval_set
from steps.evaluate.generation import ModelRun, encode_instruction, generation_job, prompt_batch
from steps.evaluate.generation_worker import GenerationJob
from steps.evaluate.settings import EngineSettings, GenerationError, GenerationSettings
from steps.evaluate.vllm_engine import engine_max_model_len, model_position_limit
from tests.model_dirs import saved_tiny


def template_lengths(tokenizer, instructions):
    """Prompt lengths through the tokenizer's own chat template (tokenized there, not via steps.chat)."""
    lengths = []
    for text in instructions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        lengths.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return lengths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model whose own limit (max_position_embeddings 1024) is below Llama's defaults."""
    return saved_tiny(tmp_path_factory.mktemp("vllm") / "model", 'tiny:{"max_position_embeddings": 1024}', tokenizer)


def _job(model_dir, tokenizer, instructions, generation, run):
    ids = [encode_instruction(tokenizer, text) for text in instructions]
    prompts = prompt_batch(ids, stop_token_ids(tokenizer), tokenizer.pad_token_id)
    return generation_job(str(model_dir), "vllm", prompts, generation, run)


def test_vllm_job_sizes_the_context_from_the_eval_set_and_seeds_the_engine_once(model_dir, tokenizer):
    eval_set = load_eval_set("embedded")
    lengths = template_lengths(tokenizer, eval_set.instructions)
    limit = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    assert limit == 1024 and max(lengths) + 300 < limit

    generation = GenerationSettings(max_new_tokens=300, seed=99)
    run = ModelRun("vllm", dtype="float32", tokenizer=tokenizer, engine=EngineSettings(gpu_memory_utilization=0.6))
    job, info = _job(model_dir, tokenizer, eval_set.instructions, generation, run)

    assert [len(p) for p in job.prompts] == lengths
    expected_len = math.ceil((max(lengths) + 300) / 256) * 256
    assert job.vllm_engine == {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "seed": 99,
        "dtype": "float32",
        "max_model_len": expected_len,
        "gpu_memory_utilization": 0.6,
    }
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in job.vllm_sampling["stop_token_ids"]
    # the same sampling for every request and no per-request seed: the engine's seed makes it repeatable
    assert job.vllm_sampling == {
        "temperature": 0.9,
        "top_p": 1.0,
        "max_tokens": 300,
        "stop_token_ids": job.vllm_sampling["stop_token_ids"],
    }
    assert info == {
        "max_model_len": expected_len,
        "model_max_position_embeddings": 1024,
        "gpu_memory_utilization": 0.6,
        "engine_seed": 99,
    }
    # what the subprocess reads is what the parent built
    assert GenerationJob(**json.loads(json.dumps(asdict(job)))) == job


def test_vllm_job_is_capped_by_the_models_limit_and_greedy_without_sampling(model_dir, tokenizer, caplog):
    instructions = load_eval_set("embedded").instructions[:3]
    longest = max(template_lengths(tokenizer, instructions))
    generation = GenerationSettings(max_new_tokens=4000, temperature=0.0)
    with caplog.at_level(logging.WARNING, logger="steps.evaluate.vllm_engine"):
        job, _ = _job(model_dir, tokenizer, instructions, generation, ModelRun("vllm", dtype="auto"))
    assert job.vllm_engine["max_model_len"] == 1024  # not ceil((longest + 4000) / 256) * 256
    assert job.vllm_engine["dtype"] == "bfloat16"  # auto: bf16, not vLLM's fp16 for fp32 exports
    assert (job.vllm_sampling["temperature"], job.vllm_sampling["top_p"]) == (0.0, 1.0)
    assert f"longest prompt {longest} + max_new_tokens 4000" in caplog.text


def test_model_position_limit_reads_the_models_config(model_dir):
    from steps.models import ensure_embedded_model

    embedded = ensure_embedded_model()
    expected = json.loads((embedded / "config.json").read_text())["max_position_embeddings"]
    assert model_position_limit(str(embedded)) == expected
    assert model_position_limit(str(model_dir)) == 1024


@pytest.mark.parametrize(
    "lengths, new, limit, requested, expected",
    [
        ([10, 500], 100, None, None, 768),  # 600 rounded up to 3 x 256
        ([10, 500], 12, None, None, 512),  # 512 is already a multiple
        ([10, 500], 100, 700, None, 700),  # never past the model's own limit
        ([10, 500], 100, None, 2048, 2048),  # a set value is used as is
        ([10, 500], 100, 1000, 2048, 1000),  # ... but capped too
    ],
)
def test_engine_max_model_len(lengths, new, limit, requested, expected):
    assert engine_max_model_len(lengths, new, limit, requested) == expected


@pytest.mark.parametrize(
    "lengths, limit, requested, field",
    [
        ([10, 500], None, 500, "max_model_len"),  # no room for one answer token
        ([10, 700], 700, None, "instructions"),  # the prompt alone fills the model's positions
    ],
)
def test_engine_max_model_len_refuses_what_cannot_answer(lengths, limit, requested, field):
    with pytest.raises(GenerationError) as err:
        engine_max_model_len(lengths, 100, limit, requested)
    assert err.value.field == field


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_model_len": 1}, "max_model_len"),
        ({"process": "thread"}, "generation_process"),
        ({"timeout_s": 0}, "generation_timeout_s"),
    ],
)
def test_engine_settings_are_checked(kwargs, field):
    with pytest.raises(GenerationError) as err:
        EngineSettings(**kwargs)
    assert err.value.field == field


def test_which_backend_generates_in_a_subprocess():
    assert EngineSettings().in_subprocess("vllm") and not EngineSettings().in_subprocess("hf")
    assert EngineSettings(process="subprocess").in_subprocess("hf")
    assert not EngineSettings(process="in_process").in_subprocess("vllm")
