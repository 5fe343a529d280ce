"""The GPU check's in-process sections: the 128k-vocabulary log-prob path at full width with gradients (checked
against plain logits + cross-entropy), SFT and DPO tokens/s and MFU through the bench's side of the real loop, and
HF generation tokens/s (vLLM when installed). Peak GPU memory is measured per phase (reset before each)."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.gpu_training import verdict

logger = logging.getLogger(__name__)

#: The log-prob path against torch's own cross-entropy over the full [tokens, vocab] logits: the per-token mean
#: difference of the row sums (nats) and the relative error of the output layer's gradient. Both compute the
#: logits in the compute dtype (bf16 on a GPU) from the same hidden states; only summation order differs.
LOGPROB_PER_TOKEN_TOLERANCE = 2e-3
LOGPROB_GRAD_RTOL = 2e-2


@contextmanager
def peak_memory(device: Any, into: dict[str, Any], key: str = "cuda_peak_mb") -> Iterator[None]:
    """``into[key]``: torch.cuda.max_memory_allocated over the block, in MiB (None on the CPU)."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        into[key] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None


def exact_length_rows(tokenizer: Any, rows: int, row_tokens: int) -> list[Any]:
    """``rows`` SFT examples of exactly ``row_tokens`` tokens: a chat prompt, then synthetic text cut to fit."""
    from benchmarks import synthetic
    from steps.chat import encode_prompt_response
    from steps.train.batching import SFTExample

    examples = []
    for index, row in enumerate(synthetic.sft_rows(tokenizer, rows, 256, seed=3)):
        prompt_ids, _ = encode_prompt_response(tokenizer, row["prompt"], "x")
        words = synthetic.WORDS * (1 + 2 * row_tokens // len(synthetic.WORDS))
        body = tokenizer(" ".join(words[index:]), add_special_tokens=False)["input_ids"]
        response = body[: row_tokens - len(prompt_ids)]
        if len(prompt_ids) + len(response) != row_tokens:
            raise RuntimeError(f"could not fill a {row_tokens}-token row (prompt {len(prompt_ids)} tokens)")
        examples.append(SFTExample(f"logprob-{index}", prompt_ids, response))
    return examples


def _reference_logprobs(model: Any, batch: Any, precision: Any) -> tuple[Any, Any]:
    """Row sums of log p(token) from the full logits through torch's cross-entropy, and d(-sum)/d(output weight)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), precision.autocast():
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    rows, cols = batch.target_mask[:, 1:].nonzero(as_tuple=True)  # token t is predicted at position t - 1
    selected, targets = hidden[:, :-1][rows, cols], batch.input_ids[:, 1:][rows, cols]
    weight = model.lm_head.weight.detach().clone().requires_grad_(True)
    with precision.autocast():
        logits = F.linear(selected, weight)
    token_lp = -F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(batch.input_ids.shape[0], device=token_lp.device).index_add(0, rows, token_lp)
    (-sums.sum()).backward()  # the loss the production path differentiates
    return sums.detach(), weight.grad


def logprob_128k(profile: dict[str, Any], device: Any) -> dict[str, Any]:
    """``sequence_logprobs`` forward and backward on a batch of ``rows x row_tokens`` tokens of the 8B-width slice
    (128,256-row untied output layer), fp32 master weights in the run's compute dtype; then the same sums and the
    output layer's gradient from plain logits and cross-entropy."""
    import torch

    from steps.models import load_model, load_tokenizer
    from steps.train.batching import collate_sft
    from steps.train.logprobs import sequence_logprobs
    from steps.train.precision import resolve_precision

    spec, shape = profile["slice_model"], profile["logprob"]
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, dtype="float32", device=str(device))
    model.train()
    precision = resolve_precision("auto", "float32", device)
    examples = exact_length_rows(tokenizer, shape["rows"], shape["row_tokens"])
    batch = collate_sft(examples, tokenizer.pad_token_id).to(device)
    out: dict[str, Any] = {"model": spec, "precision": precision.describe(), "vocab_size": model.config.vocab_size}
    with peak_memory(device, out):
        t0 = time.perf_counter()
        with precision.autocast():
            sums, counts = sequence_logprobs(model, batch)
        (-sums.sum()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["forward_backward_s"] = time.perf_counter() - t0
    grad = model.lm_head.weight.grad.float()
    ref_sums, ref_grad = _reference_logprobs(model, batch, precision)
    scored = int(counts.sum())
    prompt_tokens = sum(len(e.prompt_ids) for e in examples)
    per_token = float((sums - ref_sums).abs().max()) / min(len(e.response_ids) for e in examples)
    grad_rel = float((grad - ref_grad.float()).norm() / ref_grad.float().norm())
    checks = {
        "tokens": int(batch.attention_mask.sum()) == shape["rows"] * shape["row_tokens"],
        "scored_tokens": scored == shape["rows"] * shape["row_tokens"] - prompt_tokens,
        "finite": bool(torch.isfinite(sums).all()) and bool(torch.isfinite(grad).all()),
        "sums_match": per_token <= LOGPROB_PER_TOKEN_TOLERANCE,
        "grad_matches": grad_rel <= LOGPROB_GRAD_RTOL,
    }
    out.update(
        tokens=int(batch.attention_mask.sum()),
        rows=shape["rows"],
        scored_tokens=scored,
        prompt_tokens=prompt_tokens,
        mean_token_logprob=float(sums.sum()) / scored,
        max_per_token_diff=per_token,
        grad_rel_diff=grad_rel,
        tolerances={"per_token": LOGPROB_PER_TOKEN_TOLERANCE, "grad_rtol": LOGPROB_GRAD_RTOL},
    )
    return verdict(out, checks)


def throughput(profile: dict[str, Any], device: Any) -> dict[str, Any]:
    """The bench's SFT and DPO rows (benchmarks.prefflow_side: the real loop, length-bucketed batches): tokens/s,
    model TFLOP/s and MFU against the device's data-sheet bf16 peak, peak GPU memory per phase."""
    import torch

    from benchmarks import flops
    from benchmarks.prefflow_side import run_training
    from benchmarks.spec import MODELS, WorkerSpec

    bench = profile["bench"]
    rows: dict[str, Any] = {}
    for task in ("sft", "dpo"):
        spec = WorkerSpec(
            side="prefflow", task=task, model=bench["model"], steps=bench["steps"], warmup_steps=bench["warmup"],
            batch_size=bench["batch"], max_len=bench["max_len"], threads=torch.get_num_threads(), out="",
        )  # fmt: skip
        row: dict[str, Any] = {"model": MODELS[bench["model"]]}
        with peak_memory(device, row):
            result = run_training(spec)
        peak = flops.peak_bf16_flops(result.device) if device.type == "cuda" else None
        row.update(
            params=result.params,
            device=result.device,
            dtype=result.settings.get("dtype"),
            steps=len(result.step_times_s),
            step_tokens=result.step_tokens,
            tokens_per_s=result.tokens_per_s,
            train_tokens_per_s=result.train_tokens_per_s,
            model_tflops_per_s=(result.flops_per_s or 0) / 1e12,
            mfu=flops.mfu(result.flops_per_s, peak),
            peak_tflops=peak / 1e12 if peak else None,
            first_loss=result.first_loss,
            precompute_s=result.precompute_s,
        )
        rows[task] = row
    ok = all(r["tokens_per_s"] and r["steps"] == bench["steps"] for r in rows.values())
    return {"rows": rows, "passed": bool(ok)}


def generation(profile: dict[str, Any], device: Any, work: Path) -> dict[str, Any]:
    """Generated tokens/s of the evaluation's HF path (continuous batching, greedy) on the 1B config in the
    evaluation dtype; vLLM on the same prompts when it is installed (the bare GPU machine has none: skipped)."""
    from benchmarks import synthetic
    from steps.chat import stop_token_ids
    from steps.evaluate.decoding import ContinuousBatchDecoder
    from steps.evaluate.generation import encode_instruction
    from steps.evaluate.settings import GenerationSettings
    from steps.models import load_model, load_tokenizer
    from steps.models.load import resolve_dtype

    gen, spec = profile["gen"], profile["model"]
    tokenizer = load_tokenizer(spec)
    dtype = resolve_dtype("auto", device)
    model = load_model(spec, dtype=dtype, device=str(device))
    prompts = [encode_instruction(tokenizer, text) for text in synthetic.repeated_instructions(gen["prompts"])]
    settings = GenerationSettings(max_new_tokens=gen["tokens"], temperature=0.0, batch_size=gen["batch"])
    decoder = ContinuousBatchDecoder(model, settings, stop_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    decoder.run(prompts[:1])  # warm-up (kernels, allocator)
    out: dict[str, Any] = {"model": spec, "dtype": dtype, "prompts": len(prompts), "max_new_tokens": gen["tokens"]}
    with peak_memory(device, out):
        t0 = time.perf_counter()
        generated, stats = decoder.run(prompts)
        seconds = time.perf_counter() - t0
    counted = sum(len(ids) for ids in generated)
    out["hf"] = {
        "tokens_per_s": counted / seconds,
        "generated_tokens": counted,
        "prompt_tokens": sum(len(p) for p in prompts),
        "seconds": seconds,
        "decode_steps": stats.decode_steps,
        "mean_active_rows": stats.mean_active_rows,
    }
    checks = {
        "counted": counted == stats.generated_tokens,
        "within_limit": all(1 <= len(ids) <= gen["tokens"] for ids in generated),
    }
    if device.type != "cuda" or importlib.util.find_spec("vllm") is None:
        out["vllm"] = {"skipped": "needs a CUDA GPU" if device.type != "cuda" else "vllm not installed"}
    else:  # vLLM loads weights from disk: the same random init, saved once
        model_dir = work / "generation-model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model, decoder
        out["vllm"] = _vllm_tokens_per_s(str(model_dir), prompts, stop_token_ids(tokenizer), gen)
    return verdict(out, checks)


def _vllm_tokens_per_s(path: str, prompts: list[list[int]], stops: list[int], gen: dict[str, Any]) -> dict[str, Any]:
    """Greedy vLLM (bf16, one engine seed) on the same prompt ids and stop ids."""
    import gc

    import torch
    from vllm import LLM, SamplingParams

    longest = max(len(p) for p in prompts) + gen["tokens"]
    t0 = time.perf_counter()
    llm = LLM(model=path, dtype="bfloat16", seed=1814, gpu_memory_utilization=0.5, max_model_len=longest)
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=gen["tokens"], stop_token_ids=stops)
    inputs: Any = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:1], SamplingParams(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    results = llm.generate(inputs, params)
    seconds = time.perf_counter() - t0
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {"tokens_per_s": generated / seconds, "generated_tokens": generated, "engine_start_s": start_s}
