"""Data prep memory is bounded by the tree index: peak RSS per extra message stays far below the text per message.

A memory bound measured in fresh subprocesses (``VmHWM``), not a timing test. Full figures: benchmarks/data_prep.py.
"""

from __future__ import annotations

import json

from benchmarks.data_prep import generate_export, measure

MEAN_REPLY_CHARS = 3000
"""Long replies, so that holding the texts would cost several KB per message: the bound then tells the two apart."""
MAX_BYTES_PER_EXTRA_MESSAGE = 1500
"""The index (ids, parents, ranks, offsets, de-duplication digests) takes ~350-550 B/message here; the code that held
every text took ~14,000 B/message on the same exports."""


def test_peak_rss_grows_with_the_index_not_the_text(tmp_path):
    small, large = 3_000, 15_000
    runs = {}
    for n in (small, large):
        export = tmp_path / f"export-{n}.trees.jsonl"
        generated = generate_export(export, n, mean_chars=MEAN_REPLY_CHARS)
        runs[n] = {**generated, **measure(export, tmp_path)}
        assert runs[n]["messages_read"] == generated["messages"] and runs[n]["pairs"] > 0
    text_bytes_per_message = runs[large]["bytes"] / runs[large]["messages"]
    slope = (
        (runs[large]["peak_rss_kib"] - runs[small]["peak_rss_kib"])
        * 1024
        / (runs[large]["messages"] - runs[small]["messages"])
    )
    print(
        f"\ndata prep RSS slope: {slope:.0f} B per extra message (file: {text_bytes_per_message:.0f} B/message); "
        + json.dumps({n: {k: r[k] for k in ("messages", "bytes", "peak_rss_kib", "seconds")} for n, r in runs.items()})
    )
    assert text_bytes_per_message > 2 * MAX_BYTES_PER_EXTRA_MESSAGE  # the bound would catch texts kept in memory
    assert slope < MAX_BYTES_PER_EXTRA_MESSAGE
    # and the whole peak stays well below the input file: nothing loads it whole
    assert (runs[large]["peak_rss_kib"] - runs[large]["baseline_rss_kib"]) * 1024 < runs[large]["bytes"] / 4
