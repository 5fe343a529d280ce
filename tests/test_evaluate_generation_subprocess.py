"""Generation in a subprocess (how vLLM runs, so its GPU memory is free before held-out scoring): the HF backend
through the same job files, child process and output parsing gives exactly the in-process answers; a failing or
overrunning child is reported with its command and stderr, and is gone afterwards."""

from __future__ import annotations

import os
import re
import time

import pytest

from steps.evaluate.generation import ModelRun, answer_instructions
from steps.evaluate.generation_worker import GenerationJob, checked_token_ids, run_job_in_subprocess
from steps.evaluate.settings import EngineSettings, GenerationError, GenerationSettings
from tests.model_dirs import saved_tiny

INSTRUCTIONS = [
    "Hi",
    "Write a very long and detailed story about a dragon who learns to cook pasta in a tiny kitchen.",
    "2+2?",
    "Name three colours of the rainbow, please.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    # untied and widely initialised: the tiny model's answers then differ from prompt to prompt
    spec = 'tiny:{"tie_word_embeddings": false, "initializer_range": 0.3}'
    return saved_tiny(tmp_path_factory.mktemp("subprocess") / "model", spec, tokenizer)


def test_hf_in_a_subprocess_answers_exactly_as_in_process(model_dir, tokenizer):
    generation = GenerationSettings(max_new_tokens=6, batch_size=2, seed=7)  # sampled: the seeds must travel

    def answer(process: str):
        engine = EngineSettings(process=process)
        run = ModelRun("hf", device="cpu", dtype="float32", tokenizer=tokenizer, show_progress=False, engine=engine)
        return answer_instructions(str(model_dir), INSTRUCTIONS, "tiny", generation, run)

    child, child_info = answer("subprocess")
    here, here_info = answer("in_process")
    assert child == here
    assert len({r["output"] for r in here}) > 1  # not one answer copied everywhere
    assert (child_info["process"], here_info["process"]) == ("subprocess", "in_process")
    assert child_info["backend"] == "hf" and child_info["dtype"] == "float32"
    assert child_info["subprocess_seconds"] > 0 and "gpu_memory" not in child_info  # measured on CUDA only


def test_a_failing_child_is_named_with_its_stderr():
    job = GenerationJob(backend="tensorrt", model="x", prompts=[[1, 2]], stops=[2], pad_id=0, generation={})
    with pytest.raises(GenerationError) as err:
        run_job_in_subprocess(job, timeout_s=300)
    message = str(err.value)
    assert "-m steps.evaluate.generation_worker" in message and "failed with exit status 1" in message
    assert "generation job backend must be hf or vllm, got 'tensorrt'" in message  # from the child's traceback


def test_a_child_past_its_timeout_is_killed(model_dir):
    job = GenerationJob(
        backend="hf",
        model=str(model_dir),
        prompts=[[1, 2, 3]],
        stops=[2],
        pad_id=0,
        generation={"max_new_tokens": 4},
        device="cpu",
        dtype="float32",
    )
    started = time.monotonic()
    with pytest.raises(GenerationError) as err:
        run_job_in_subprocess(job, timeout_s=0.2)  # importing torch alone takes longer
    assert time.monotonic() - started < 30  # SIGTERM, then SIGKILL after 10 s at most
    assert err.value.field == "generation_timeout_s" and "was killed" in str(err.value)
    pid = int(re.search(r"generation subprocess (\d+)", str(err.value)).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize(
    "output, message",
    [
        ({"token_ids": [[1], [2, 3]]}, None),
        ({"token_ids": [[1]]}, "returned 1 answers for 2 prompts"),
        ({"tokens": []}, "returned NoneType answers for 2 prompts"),
        ({"token_ids": [[1], [2, "x"]]}, "answer 1 is not a list of token ids"),
        ({"token_ids": [[1], [True]]}, "answer 1 is not a list of token ids"),
    ],
)
def test_child_output_is_checked(output, message):
    if message is None:
        assert checked_token_ids(output, 2) == [[1], [2, 3]]
        return
    with pytest.raises(GenerationError, match=re.escape(message)):
        checked_token_ids(output, 2)
