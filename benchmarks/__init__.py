"""Side-by-side benchmark of PrefFlow against TRL (and batched against one-at-a-time generation).

Not part of the installed ``steps`` package: it imports ``steps`` like user code. ``python -m benchmarks --help``.
"""
