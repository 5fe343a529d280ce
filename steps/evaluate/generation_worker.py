"""Generation in a child process, so that the engine's GPU memory is the driver's again before the parent loads
models for held-out scoring: ``python -m steps.evaluate.generation_worker JOB OUTPUT``.

The parent writes the job (prompt token ids, stop ids, sampling and engine settings) as JSON, waits a bounded time
while the child's stderr (logs, progress) is relayed, and reads the generated token ids back; the child writes
them atomically. On CUDA the parent then checks and logs that the GPU's free memory is back to what it was.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from steps.evaluate.settings import GenerationError

MODULE = "steps.evaluate.generation_worker"
logger = logging.getLogger(MODULE)  # not __main__ in the child
JOB_FILE = "job.json"
OUTPUT_FILE = "output.json"
#: How much of the child's stderr a failure message quotes.
STDERR_TAIL_BYTES = 4000
#: After SIGTERM, how long the child's process group gets before SIGKILL.
KILL_GRACE_S = 10.0
#: How long the parent waits for the GPU's free memory to come back after the child exited, and what may differ.
MEMORY_WAIT_S = 60.0
MEMORY_SLACK_BYTES = 512 << 20


@dataclass(frozen=True)
class GenerationJob:
    """What the child generates: token-level inputs only (the parent tokenizes and decodes).

    ``model``: a model spec (HF backend, loaded with ``dtype`` on ``device``); for vLLM ``vllm_engine`` and
    ``vllm_sampling`` carry the ``LLM`` / ``SamplingParams`` keywords (steps/evaluate/vllm_engine.py)."""

    backend: str
    model: str
    prompts: list[list[int]]
    stops: list[int]
    pad_id: int
    generation: dict[str, Any]
    device: str = "auto"
    dtype: str = "auto"
    vllm_engine: dict[str, Any] = field(default_factory=dict)
    vllm_sampling: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True


def job_token_ids(job: GenerationJob) -> list[list[int]]:
    """The job's generated ids per prompt, in order, in this process (the child's work; also usable in process)."""
    if job.backend == "vllm":
        from steps.evaluate.vllm_engine import vllm_token_ids

        return vllm_token_ids(job.vllm_engine, job.vllm_sampling, job.prompts, job.show_progress)
    if job.backend != "hf":
        raise GenerationError(f"generation job backend must be hf or vllm, got {job.backend!r}", "backend")
    from steps.evaluate.generation import hf_token_ids, prompt_batch, resolve_device
    from steps.evaluate.settings import GenerationSettings
    from steps.models import load_model

    model = load_model(job.model, dtype=job.dtype, device=resolve_device(job.device))
    prompts = prompt_batch(job.prompts, job.stops, job.pad_id)
    return hf_token_ids(model, prompts, GenerationSettings(**job.generation), show_progress=job.show_progress)


def main(argv: list[str] | None = None) -> int:
    """The child: read the job, generate, write ``{"token_ids": [...], "seconds": s}`` atomically."""
    from steps.io import read_json, write_json

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help=f"the job ({JOB_FILE}) the parent wrote")
    parser.add_argument("output", type=Path, help="where the generated token ids go (written atomically)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    job = GenerationJob(**read_json(args.job))
    logger.info(
        "generation subprocess %d: %d prompts with %s (%s)", os.getpid(), len(job.prompts), job.model, job.backend
    )
    started = time.monotonic()
    token_ids = job_token_ids(job)
    write_json(args.output, {"token_ids": token_ids, "seconds": time.monotonic() - started}, indent=None)
    logger.info("generation subprocess %d: wrote %s", os.getpid(), args.output)
    return 0


def run_job_in_subprocess(job: GenerationJob, timeout_s: float) -> tuple[list[list[int]], dict[str, Any]]:
    """The job's token ids from a child process, and what the run measured (seconds; GPU memory on CUDA).

    Raises GenerationError naming the command, with the tail of the child's stderr, when the child fails, runs
    past ``timeout_s`` (it and its process group are killed) or writes no valid output."""
    from steps.io import read_json, write_json

    with tempfile.TemporaryDirectory(prefix="prefflow-generate-") as work:
        job_path, output_path = Path(work) / JOB_FILE, Path(work) / OUTPUT_FILE
        write_json(job_path, asdict(job), indent=None)
        command = [sys.executable, "-m", MODULE, str(job_path), str(output_path)]
        before = gpu_memory()
        started = time.monotonic()
        _run_child(command, timeout_s)
        if not output_path.is_file():
            raise GenerationError(f"generation subprocess `{' '.join(command)}` exited 0 but wrote no {OUTPUT_FILE}")
        output = read_json(output_path)
    token_ids = checked_token_ids(output, len(job.prompts))
    info: dict[str, Any] = {"process": "subprocess", "subprocess_seconds": time.monotonic() - started}
    if before is not None:
        info["gpu_memory"] = memory_back(before)
    return token_ids, info


def checked_token_ids(output: Any, n_prompts: int) -> list[list[int]]:
    """``output["token_ids"]`` when it is one list of integer ids per prompt; else GenerationError saying what."""
    ids = output.get("token_ids") if isinstance(output, dict) else None
    if not isinstance(ids, list) or len(ids) != n_prompts:
        count = len(ids) if isinstance(ids, list) else type(ids).__name__
        raise GenerationError(f"generation subprocess returned {count} answers for {n_prompts} prompts")
    for index, answer in enumerate(ids):
        if not isinstance(answer, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in answer):
            raise GenerationError(
                f"generation subprocess answer {index} is not a list of token ids: {str(answer)[:80]}"
            )
    return ids


def _child_env() -> dict[str, str]:
    """This environment, with the checkout that holds ``steps`` first on PYTHONPATH (a plain checkout works too)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_child(command: list[str], timeout_s: float) -> None:
    """Run ``command`` in its own process group, relaying its stderr; bounded by ``timeout_s``; the group is gone
    when this returns or raises."""
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_child_env(), start_new_session=True
    )
    assert proc.stderr is not None
    relay = _StderrRelay(proc.stderr)
    relay.start()
    shown = " ".join(command)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        relay.join(KILL_GRACE_S)
        raise GenerationError(
            f"generation subprocess {proc.pid} (`{shown}`) ran past evaluation.generation_timeout_s={timeout_s:g} "
            f"s and was killed; the last of its stderr:\n{relay.tail()}",
            "generation_timeout_s",
        ) from None
    except BaseException:  # interrupted: take the child (and its GPU memory) down too
        _stop_group(proc)
        raise
    if _group_alive(proc.pid):
        logger.warning("generation subprocess %d left processes behind: stopping its process group", proc.pid)
        _stop_group(proc)
    relay.join(KILL_GRACE_S)
    if code != 0:
        raise GenerationError(
            f"generation subprocess {proc.pid} (`{shown}`) failed with exit status {code}; the last of its "
            f"stderr:\n{relay.tail()}"
        )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc.pid):
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)
            else:
                time.sleep(0.2)
        if not _group_alive(proc.pid):
            break
    proc.poll()


class _StderrRelay(threading.Thread):
    """Copies the child's stderr to ours as it comes (logs, progress bars) and keeps its last bytes."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True, name="generation-stderr")
        self._stream = stream
        self._tail = bytearray()

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = self._stream.fileno()
        while chunk := os.read(fd, 65536):
            self._tail = (self._tail + chunk)[-STDERR_TAIL_BYTES:]
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
        self._stream.close()

    def tail(self) -> str:
        return bytes(self._tail).decode("utf-8", errors="replace").strip() or "(nothing on stderr)"


def gpu_memory() -> dict[str, int] | None:
    """Free and total bytes of this process's current CUDA device, and what this process reserves; None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {"free": int(free), "total": int(total), "reserved_here": int(torch.cuda.memory_reserved())}


def memory_back(before: dict[str, int], wait_s: float = MEMORY_WAIT_S) -> dict[str, Any]:
    """Wait (bounded) until the GPU's free memory is back to ``before`` (within :data:`MEMORY_SLACK_BYTES`), log
    what it is, and return the numbers; ``returned`` says whether it came back."""
    deadline = time.monotonic() + wait_s
    after = gpu_memory() or before
    while after["free"] < before["free"] - MEMORY_SLACK_BYTES and time.monotonic() < deadline:
        time.sleep(0.5)
        after = gpu_memory() or before
    returned = after["free"] >= before["free"] - MEMORY_SLACK_BYTES
    gib = 1 << 30
    record = {
        "free_before_gib": round(before["free"] / gib, 3),
        "free_after_gib": round(after["free"] / gib, 3),
        "total_gib": round(after["total"] / gib, 3),
        "reserved_here_gib": round(after["reserved_here"] / gib, 3),
        "returned": returned,
    }
    (logger.info if returned else logger.warning)(
        "GPU memory after the generation subprocess: %.2f GiB free of %.2f (%.2f before it started; this process "
        "reserves %.2f GiB)%s",
        record["free_after_gib"],
        record["total_gib"],
        record["free_before_gib"],
        record["reserved_here_gib"],
        "" if returned else f": NOT back after {wait_s:g} s; another process holds the GPU's memory",
    )
    return record


if __name__ == "__main__":
    sys.exit(main())
