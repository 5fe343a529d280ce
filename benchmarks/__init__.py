"""Side-by-side speed benchmark: PrefFlow's training and generation against TRL and one-at-a-time prompts.

``python -m benchmarks --help``. Modules: ``synthetic`` (deterministic data), ``hardware`` (device, threads,
malloc, memory, MFU), ``spec`` (what a child runs and reports), ``prefflow_side`` / ``trl_side`` (the two
sides), ``worker`` (child entry point), ``runner`` (processes, rows, tables), ``cli``.
"""
