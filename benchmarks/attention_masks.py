"""What the attention masks of a shared-prompt micro-batch cost: collate time, the bytes a batch carries, the dense
mask's bytes and build time (what collate built on the CPU before, what SDPA gets at the forward now), the
FlexAttention block mask's bytes; with ``--forward MODEL`` also the forward of SDPA (dense mask) against flex
attention (block mask, compiled as transformers runs it) on this machine. One JSON object per line.

    python -m benchmarks.attention_masks --pairs 8 --lengths 1024,8192
    python -m benchmarks.attention_masks --pairs 4 --lengths 512 --forward tiny
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import torch

from steps.train.attention import FLEX, block_mask, dense_mask
from steps.train.batching import PairExample, TokenBatch, collate_pairs


def synthetic_pairs(count: int, length: int, seed: int = 0) -> list[PairExample]:
    """``count`` pairs whose shared row is up to ``length`` tokens: prompt 1/4, the responses 3/8 each."""
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        total = length - rng.randrange(0, max(1, length // 8))
        prompt = total // 4
        chosen = (total - prompt) // 2
        ids = [rng.randrange(5, 49_000) for _ in range(total)]
        pairs.append(PairExample(str(i), ids[:prompt], ids[prompt : prompt + chosen], ids[prompt + chosen :]))
    return pairs


def cpu_ms(work: Any, repeats: int) -> tuple[float, Any]:
    """Median CPU milliseconds of ``work()`` (CPU time: the machine may be shared) and its last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.process_time()
        result = work()
        times.append(time.process_time() - started)
    return round(statistics.median(times) * 1e3, 2), result


def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def mask_costs(pairs: int, length: int, repeats: int) -> dict:
    examples = synthetic_pairs(pairs, length)
    collate, batch = cpu_ms(lambda: collate_pairs(examples, 0, share_prompt=True), repeats)
    segments = batch.extra["segment_ids"]
    dense, allowed = cpu_ms(lambda: dense_mask(segments), max(1, repeats // 3))
    one_row = block_mask(segments[:1])  # its size is linear in rows; one row keeps the eager build small
    return {
        "pairs": pairs,
        "row_tokens": batch.input_ids.shape[1],
        "collate_cpu_ms": collate,
        "batch_MiB": round(nbytes([batch.input_ids, batch.attention_mask, *batch.extra.values()]) / 2**20, 3),
        "segment_ids_MiB": round(nbytes([segments]) / 2**20, 4),
        "dense_mask_MiB": round(nbytes([allowed]) / 2**20, 1),
        "dense_mask_build_cpu_ms": dense,
        "block_mask_MiB": round(pairs * nbytes(one_row.as_tuple()) / 2**20, 3),
        "blocks_skipped_pct_row0": round(one_row.sparsity(), 1),
    }


def forward_costs(spec: str, batch: TokenBatch, repeats: int) -> list[dict]:
    """SDPA with the dense mask against flex attention with the block mask, forward only (flex attention has no
    backward on CPU), the first call (flex compiles there) timed apart."""
    from steps.models import load_model
    from steps.train.logprobs import sequence_logprobs

    rows = []
    for implementation in ("sdpa", FLEX):
        model = load_model(spec, attn_implementation=implementation)

        def forward(model: Any = model) -> Any:
            with torch.no_grad():
                return sequence_logprobs(model, batch)

        started = time.perf_counter()
        forward()
        first = time.perf_counter() - started
        median, _ = cpu_ms(forward, repeats)
        rows.append({"model": spec, "attention": implementation, "first_call_s": round(first, 1), "cpu_ms": median})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--lengths", default="1024,8192", help="shared-row lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forward", default=None, help="also time the forward of this model spec (e.g. tiny)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for length in (int(x) for x in args.lengths.split(",")):
        print(json.dumps(mask_costs(args.pairs, length, args.repeats)), flush=True)
        if args.forward:
            batch = collate_pairs(synthetic_pairs(args.pairs, length), 0, share_prompt=True)
            for row in forward_costs(args.forward, batch, args.repeats):
                print(json.dumps({**row, "pairs": args.pairs, "row_tokens": batch.input_ids.shape[1]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
