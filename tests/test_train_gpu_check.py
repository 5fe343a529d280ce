"""The GPU check's dry run under a bare GPU node's conditions: ``python -m benchmarks.gpu_check --device cpu`` from a
plain copy of the checkout (the files git would hand over, nothing installed from it), where metaflow, alpaca_eval,
datasets, gguf and vllm cannot be imported, the model cache is empty and no package index answers. It runs every
section of the script `make gpu-check` runs on a GPU (tiny sizes of the same configs, gloo instead of NCCL)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What the lent GPU machines lack (FIELD_NOTES: torch, transformers, accelerate, peft, safetensors, tokenizers,
#: pyyaml, numpy, pandas, matplotlib, scikit-learn only).
MISSING = ("metaflow", "alpaca_eval", "datasets", "gguf", "vllm")
CARRY_LIMIT = 64 * 2**20  # extra files that travel with a call to the GPU machine

# Hides MISSING as if never installed: the path finder says "not found" (find_spec -> None, import ->
# ModuleNotFoundError) and importlib.metadata lists no distribution of theirs.
SITECUSTOMIZE = """
import importlib.machinery
import sys

_HIDDEN = {hidden!r}


def _hidden(name):
    return name.partition(".")[0].replace("-", "_").lower() in _HIDDEN


class _PathFinderWithout(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        return None if _hidden(fullname) else super().find_spec(fullname, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        for dist in super().find_distributions(*args, **kwargs):
            if not _hidden(dist.metadata["Name"] or ""):
                yield dist


sys.meta_path[:] = [_PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def checkout_files() -> list[str]:
    """The files a plain checkout of the working tree holds: tracked plus untracked-not-ignored ones."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return sorted({name for name in listed.split("\0") if name and (REPO / name).is_file()})


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> dict[str, Path | dict[str, str]]:
    """A plain copy of the checkout and the environment of a bare GPU node (but for the CPU)."""
    root = tmp_path_factory.mktemp("bare")
    checkout = root / "checkout"
    for name in checkout_files():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, checkout / name)
    hide = root / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=MISSING))
    for empty in ("home", "cache"):
        (root / empty).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFFLOW_", "HF_", "PIP_", "XDG_"))}
    env.update(
        PYTHONPATH=f"{checkout}{os.pathsep}{hide}", HOME=str(root / "home"), PREFFLOW_CACHE=str(root / "cache"),
        HF_HUB_OFFLINE="1", PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_INDEX="1", OMP_NUM_THREADS="1",
    )  # fmt: skip
    return {"checkout": checkout, "root": root, "env": env}


def _run(bare: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=bare["checkout"], env=bare["env"], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def dry_run(bare) -> dict:
    out = bare["root"] / "check.json"
    proc = _run(bare, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert json.loads(out.read_text()) == report
    return report


def test_the_bare_environment_lacks_what_a_gpu_node_lacks(bare):
    code = (
        "import importlib.util, importlib.metadata as md, sys\n"
        "for name in sys.argv[1:]:\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'{name} imported')\n"
        "import steps, torch, transformers, tokenizers\n"
        "print(steps.__file__)\n"
    )
    proc = _run(bare, "-c", code, *MISSING, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(bare["checkout"] / "steps" / "__init__.py")
    assert not any((bare["root"] / "cache").iterdir())


def test_the_checkout_a_call_carries_stays_under_64_mib():
    total = sum((REPO / name).stat().st_size for name in checkout_files())
    assert total < CARRY_LIMIT, f"{total / 2**20:.1f} MiB"


def test_dry_run_passes_every_section_from_the_bare_checkout(dry_run, bare):
    assert dry_run["ok"] and dry_run["failed"] == []
    assert dry_run["checkout"] == str(bare["checkout"])
    for section in ("dpo_precision", "gradient_checkpointing", "process_group", "logprob_128k", "throughput",
                    "generation"):  # fmt: skip
        assert dry_run[section]["ok"] and dry_run[section].get("passed", True), dry_run[section]
    assert dry_run["seconds"] < 600
    assert not any((bare["root"] / "cache").iterdir())  # nothing fetched or converted


def _config(profile_spec: str) -> dict:
    """config.json of a ``random:<name>:{overrides}`` spec with its overrides applied, read here."""
    name, _, overrides = profile_spec.removeprefix("random:").partition(":")
    raw = json.loads((REPO / "configs" / "models" / name / "config.json").read_text())
    return {**raw, **json.loads(overrides or "{}")}


def _parameters(c: dict) -> int:
    h, kv, hd = c["hidden_size"], c["num_key_value_heads"], c["head_dim"]
    layer = 2 * h * c["num_attention_heads"] * hd + 2 * h * kv * hd + 3 * h * c["intermediate_size"] + 2 * h
    return c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + c["num_hidden_layers"] * layer + h


def _pair_tokens(spec: str, pairs: int, max_len: int) -> int:
    """Tokens of the check's synthetic DPO data, tokenized here: two sequences a pair, the prompt in each."""
    from benchmarks import synthetic
    from steps.models import load_tokenizer
    from steps.train.batching import tokenize_pairs

    tokenizer = load_tokenizer(spec)
    examples, _ = tokenize_pairs(synthetic.preference_rows(tokenizer, pairs, max_len, seed=1), tokenizer, max_len)
    return sum(2 * len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in examples)


def test_dpo_precision_moves_fp32_weights_and_starts_at_ln2(dry_run):
    mp, profile = dry_run["dpo_precision"], dry_run["profile"]
    bf16, fp32 = mp["runs"]["bfloat16"], mp["runs"]["float32"]
    assert bf16["precision"] == "bfloat16 compute, float32 master weights (cpu)"
    assert fp32["precision"] == "float32 (cpu)"
    assert {r["layout"]["parallelism"] for r in (bf16, fp32)} == {"fsdp"} and bf16["world_size"] == 1
    steps = profile["dpo"]["steps"]
    for run in (bf16, fp32):
        assert len(run["losses"]) == steps == 3
        assert abs(run["losses"][0] - math.log(2)) <= 1e-3 and abs(run["logits"][0]) <= 1e-3
        weights = run["weights"]
        assert weights["entries"] == _parameters(_config(profile["model"]))
        assert weights["moved_fraction"] == pytest.approx(weights["changed"] / weights["entries"])
        assert weights["moved_fraction"] >= 0.5  # fp32 master weights take a 1e-8 step
        assert weights["moved_fraction_bf16"] < 0.05  # ... which bf16 rounding erases almost everywhere
    # every pair trained once: the loop's token counts are the data's, tokenized here
    assert sum(bf16["tokens"]) == sum(fp32["tokens"]) == _pair_tokens(profile["model"], 12, profile["dpo"]["max_len"])
    diffs = [abs(a - b) for a, b in zip(bf16["losses"], fp32["losses"])]
    assert max(diffs) == pytest.approx(mp["max_abs_loss_diff"]) and max(diffs) <= mp["loss_tolerance"] == 0.1
    assert mp["auto_dtype"] == "float32" and all(mp["checks"].values())


def test_gradient_checkpointing_matches_the_run_without(dry_run):
    gc = dry_run["gradient_checkpointing"]
    with_gc, without = gc["with_checkpointing"], gc["without"]
    assert with_gc["layout"]["parallelism"] == "fsdp" and with_gc["steps"] == 3
    assert without["losses"] == dry_run["dpo_precision"]["runs"]["bfloat16"]["losses"]
    assert max(abs(a - b) for a, b in zip(with_gc["losses"], without["losses"])) <= 1e-3
    for a, b in zip(with_gc["grad_norms"], without["grad_norms"]):
        assert a == pytest.approx(b, rel=1e-2) and a > 0
    assert with_gc["weights"]["moved_fraction"] >= 0.5


def test_process_group_section_resumes_a_ddp_checkpoint_under_fsdp(dry_run):
    pg = dry_run["process_group"]
    assert pg["backend"] == "gloo" and pg["passed"]
    assert pg["runs"]["ddp"]["steps"] == 1 and pg["runs"]["ddp"]["resumed_from"] is None
    assert pg["runs"]["fsdp"]["steps"] == 2 and pg["runs"]["fsdp"]["resumed_from"].endswith("step_0000001")
    assert {r["world_size"] for r in pg["runs"].values()} == {1}
    # DDP under autocast, then FSDP2 through its MixedPrecisionPolicy: both bf16 compute on fp32 weights
    assert {r["precision"] for r in pg["runs"].values()} == {"bfloat16 compute, float32 master weights (cpu)"}


def test_logprob_section_scores_the_128k_vocabulary_with_gradients(dry_run):
    lp = dry_run["logprob_128k"]
    shape = dry_run["profile"]["logprob"]
    assert lp["vocab_size"] == 128_256 and _config(lp["model"])["tie_word_embeddings"] is False
    assert lp["tokens"] == shape["rows"] * shape["row_tokens"]
    assert lp["scored_tokens"] == lp["tokens"] - lp["prompt_tokens"] > 0
    # a small random init is close to uniform over the 128,256 rows
    assert lp["mean_token_logprob"] == pytest.approx(-math.log(128_256), abs=0.1)
    assert lp["max_per_token_diff"] <= 2e-3 and lp["grad_rel_diff"] <= 2e-2 and lp["cuda_peak_mb"] is None


def test_throughput_and_generation_sections_report_rates(dry_run):
    bench = dry_run["profile"]["bench"]
    for task in ("sft", "dpo"):
        row = dry_run["throughput"]["rows"][task]
        assert row["tokens_per_s"] > 0 and row["model_tflops_per_s"] > 0 and row["steps"] == bench["steps"]
        assert row["params"] == _parameters(_config(row["model"]))
        assert row["mfu"] is None and row["cuda_peak_mb"] is None  # no data-sheet peak, no GPU memory on a CPU
    assert dry_run["throughput"]["rows"]["dpo"]["first_loss"] == pytest.approx(math.log(2), abs=1e-3)
    gen = dry_run["generation"]
    from benchmarks import synthetic
    from steps.evaluate.generation import encode_instruction
    from steps.models import load_tokenizer

    tokenizer = load_tokenizer(gen["model"])
    prompts = synthetic.repeated_instructions(gen["prompts"])
    assert gen["hf"]["prompt_tokens"] == sum(len(encode_instruction(tokenizer, p)) for p in prompts)
    assert gen["prompts"] <= gen["hf"]["generated_tokens"] <= gen["prompts"] * gen["max_new_tokens"]
    assert gen["hf"]["tokens_per_s"] == pytest.approx(gen["hf"]["generated_tokens"] / gen["hf"]["seconds"])
    assert gen["vllm"] == {"skipped": "needs a CUDA GPU"}


def test_asking_for_a_gpu_without_one_fails_clearly(bare):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run(bare, "-m", "benchmarks.gpu_check", "--device", "cuda", timeout=120)
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"ok": False, "error": "no CUDA GPU visible; use --device cpu for the dry run"}


def test_make_gpu_check_runs_the_check_with_no_setup():
    makefile = (REPO / "Makefile").read_text()
    rule = makefile.split("\ngpu-check:", 1)[1].split("\n\n", 1)[0]
    first, *recipe = rule.splitlines()
    assert first.strip() == ""  # no prerequisites: no venv, no model download
    assert [line.strip() for line in recipe] == ["PYTHONPATH=. python3 -m benchmarks.gpu_check $(GPU_CHECK_ARGS)"]
