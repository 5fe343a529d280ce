"""Model cards from a real tiny-model DPO training run, and the Hub upload's offline dry run."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from steps.hub import PublishError, check_publish, push_to_hub, repo_id_for, upload_files
from steps.model_card import ModelCardError, base_model_id, card_metadata, render_model_card, write_model_card
from tests.eval_results import alpaca_eval_result

PATHSPEC = "PrefFlow/1700000000000042"
RAW_CONFIG = {
    "name": "card_test",
    "data": {"input": "embedded", "max_trees": 14, "dev_fraction": 0.2},
    "model": {"base": "tiny", "dtype": "float32"},
    "preference": {
        "criterion": "dpo",
        "criterion_config": {"beta": 0.1},
        "lr": 1.0e-3,
        "max_num_tokens": 1024,
        "max_seq_len": 256,
        "overlength": "truncate",
        "max_steps": 2,
    },
}
# what steps.pipeline.evaluate_variant hands the card: the variant's AlpacaEval result
WEAK_EVAL = dataclasses.replace(
    alpaca_eval_result(
        judge="local_logprob:embedded:smollm2-135m-instruct",
        length_controlled_winrate=46.79,
        lc_standard_error=0.875,
        lc_method="length_controlled_v1 without instruction difficulty (subset of 24)",
        lc_unavailable_reason=None,
    ),
    eval_set="embedded",
    subset=False,
    reference_generator="embedded:smollm2-135m-instruct",
)
STRONG_EVAL = dataclasses.replace(
    WEAK_EVAL,
    judge=dataclasses.replace(WEAK_EVAL.judge, label="alpaca_eval:weighted_alpaca_eval_gpt4_turbo", weak=False),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real DPO run of the tiny model on the embedded data (2 optimizer steps), as the flow's step does it."""
    from steps.config import config_from_dict, for_loss
    from steps.data.oasst import OasstOptions, prepare_oasst
    from steps.train.launch import launch

    root = tmp_path_factory.mktemp("publish")
    prepare_oasst("embedded", root / "data", OasstOptions(max_trees=14, dev_fraction=0.2))
    os.environ["OMP_NUM_THREADS"] = "1"
    summary = launch(
        for_loss(config_from_dict(RAW_CONFIG, "card_test"), "dpo"),
        "dpo",
        str(root / "data"),
        str(root / "runs" / PATHSPEC / "dpo"),
    )
    run_config = config_from_dict(RAW_CONFIG, "card_test").to_dict()
    rows = [json.loads(line) for line in Path(summary.metrics_path).read_text().splitlines()]
    return {
        "root": root,
        "summary": summary,
        "run_config": run_config,
        "train_rows": [r for r in rows if r.get("split") != "dev"],
        "dev_rows": [r for r in rows if r.get("split") == "dev"],
        "n_pairs": len((root / "data" / "preference.train.jsonl").read_text().splitlines()),
        "n_dev_pairs": len((root / "data" / "preference.dev.jsonl").read_text().splitlines()),
    }


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def table(card: str, heading: str) -> dict[str, list[str]]:
    """The first Markdown table under ``heading``: first cell -> the other cells."""
    section = card.split(heading, 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    rows = rows[2 : next((i for i, r in enumerate(rows) if i > 2 and r.startswith("| metric")), len(rows))]
    cells = {}
    for row in rows:
        parts = [c.strip() for c in row.strip("|").split("|")]
        cells[parts[0]] = parts[1:]
    return cells


def card_of(trained, eval_result=None) -> str:
    return render_model_card(
        summary=trained["summary"], run_config=trained["run_config"], eval_result=eval_result, pathspec=PATHSPEC
    )


def test_card_front_matter_of_a_tiny_embedded_run(trained):
    meta = front_matter(card_of(trained, WEAK_EVAL))
    # tiny base (no Hub model), embedded data (not OpenAssistant's), weak judge (no model-index results)
    assert meta == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["prefflow", "preference-optimization", "dpo"],
        "language": ["en"],
    }


def test_card_says_how_the_model_was_made(trained):
    card = card_of(trained)
    assert "# DPO model trained with PrefFlow" in card
    assert f"run `{PATHSPEC}`" in card
    assert "preference optimisation with the `dpo` loss" in card
    assert "- **Loss**: `dpo` with beta=0.1, nll_scale=0, label_smoothing=0, length_normalization=False" in card
    assert "- **Initialised from**: base: tiny (`tiny`)" in card
    assert "- **Reference model**: `tiny` (precomputed log-probs)" in card
    assert f"  - train: {trained['n_pairs']} examples kept" in card
    assert f"  - dev: {trained['n_dev_pairs']} examples kept" in card
    assert "embedded hand-written OpenAssistant-style sample" in card
    assert "AdamW lr 0.001 (cosine to 0.1 x lr, 0 warmup steps), betas [0.9, 0.95], weight decay 0.1" in card
    assert "stopped at max_steps 2, seed 1814, dtype `float32`" in card
    assert f"- **Run**: {len(trained['train_rows'])} optimizer steps in" in card
    assert "PrefFlow's tiny randomly initialised test model" in card
    # the full configs, reloadable
    configs = [block.split("```", 1)[0] for block in card.split("```yaml\n")[1:]]
    assert yaml.safe_load(configs[0])["criterion_config"]["beta"] == 0.1
    assert yaml.safe_load(configs[1]) == trained["run_config"]


def test_card_training_metrics_are_the_last_logged_values(trained):
    cells = table(card_of(trained), "## Training metrics")
    last_train, last_dev = trained["train_rows"][-1], trained["dev_rows"][-1]
    assert len(trained["train_rows"]) == 2 and last_dev["step"] == 2
    for key in ("loss", "reward_accuracy", "reward_margin", "rewards_chosen", "nll", "grad_norm", "lr"):
        assert cells[key][0] == f"{last_train[key]:.4g}", key
    for key in ("loss", "reward_accuracy", "reward_margin", "nll"):
        assert cells[key][1] == f"{last_dev['dev_' + key]:.4g}", key
    assert cells["lr"][1] == "n/a" and "step_time_s" not in cells and "pairs" not in cells


def test_card_eval_results_with_the_weak_judge_caveat(trained):
    card = card_of(trained, WEAK_EVAL)
    cells = table(card, "## Evaluation (AlpacaEval 2)")
    assert cells["LC win rate"] == ["46.79 ± 0.875"]
    assert cells["win rate"] == ["45.41 ± 3.125"]
    assert cells["wins / losses / draws against the reference"] == ["11 / 13 / 0"]
    assert "- **Judge**: `local_logprob:embedded:smollm2-135m-instruct`" in card
    assert "**Caveat: weak judge.**" in card and "not model quality" in card
    assert "model-index" not in front_matter(card)


def test_card_eval_results_from_a_real_judge_go_into_the_model_index(trained):
    card = card_of(trained, dataclasses.replace(STRONG_EVAL, subset=True))
    assert "**Caveat: weak judge.**" not in card and "depend on the judge" in card
    assert "(a subset: not comparable with the AlpacaEval leaderboard)" in card
    (entry,) = front_matter(card)["model-index"]
    metrics = {m["type"]: m["value"] for m in entry["results"][0]["metrics"]}
    assert metrics == {"length_controlled_winrate": 46.79, "win_rate": 45.41}
    assert entry["results"][0]["source"]["name"] == "judge alpaca_eval:weighted_alpaca_eval_gpt4_turbo"


def test_card_without_evaluation_says_so(trained):
    assert "Not evaluated in this run" in card_of(trained, None)


@pytest.mark.parametrize(
    ("base", "data_input", "expected_base", "expected_datasets"),
    [
        ("embedded:smollm2-135m-instruct", "embedded", "HuggingFaceTB/SmolLM2-135M-Instruct", None),
        ("meta-llama/Llama-3.1-8B", "OpenAssistant/oasst2", "meta-llama/Llama-3.1-8B", ["OpenAssistant/oasst2"]),
        ("/models/my-base", "/data/oasst2.trees.jsonl", None, None),
        ("tiny", "embedded", None, None),
    ],
)
def test_front_matter_names_hub_models_and_datasets_only(trained, base, data_input, expected_base, expected_datasets):
    run_config = {**trained["run_config"], "model": {"base": base}, "data": {"input": data_input, "langs": ["en"]}}
    meta = card_metadata(trained["summary"], run_config, None)
    assert meta.get("base_model") == expected_base and meta.get("datasets") == expected_datasets
    assert base_model_id(base) == expected_base


def test_write_model_card_writes_readme_atomically(trained, tmp_path):
    model_dir = Path(trained["summary"].model_dir)
    path = write_model_card(
        model_dir,
        summary=trained["summary"],
        run_config=trained["run_config"],
        eval_result=WEAK_EVAL,
        pathspec=PATHSPEC,
    )
    assert path == model_dir / "README.md" and path.read_text() == card_of(trained, WEAK_EVAL)
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # no temp file left
    with pytest.raises(ModelCardError, match=r"no config\.json"):
        write_model_card(tmp_path, summary=trained["summary"], run_config=trained["run_config"], eval_result=None)
    with pytest.raises(ModelCardError, match=r"the training summary is a dict; pass the steps\.results\.TrainResult"):
        render_model_card(summary={"steps": 1}, run_config={}, eval_result=None)


# ----------------------------------------------------------------------------------------- Hub upload


@pytest.fixture()
def carded(trained):
    model_dir = Path(trained["summary"].model_dir)
    write_model_card(model_dir, summary=trained["summary"], run_config=trained["run_config"], eval_result=None)
    return model_dir


@pytest.fixture()
def hub_env(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return monkeypatch


@pytest.mark.parametrize("variable", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_dry_run_lists_the_upload_offline(carded, hub_env, variable):
    secret = "hf_test_secret_token_value"
    hub_env.setenv(variable, secret)
    plan = push_to_hub(carded, "prefflow-user/tiny-dpo", private=True, dry_run=True)
    expected = sorted((p.name, p.stat().st_size) for p in carded.iterdir() if p.is_file() and p.name != "COMPLETE")
    assert [(f["path"], f["bytes"]) for f in plan["files"]] == expected
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= {name for name, _ in expected}
    assert plan["total_bytes"] == sum(size for _, size in expected)
    assert plan["token_env"] == variable and plan["private"] is True and plan["dry_run"] is True
    assert plan["url"] == "https://huggingface.co/prefflow-user/tiny-dpo"
    assert secret not in json.dumps(plan)


@pytest.mark.parametrize("repo_id", ["no-owner", "a/b/c", "me/has space", "me/--double", ""])
def test_bad_repo_ids_are_rejected_before_anything(carded, hub_env, repo_id):
    hub_env.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(PublishError, match="repo_id"):
        push_to_hub(carded, repo_id, private=True, dry_run=True)


def test_the_token_comes_from_the_environment_only(carded, hub_env, tmp_path):
    token_file = tmp_path / "hf-home" / "token"  # a cached `huggingface-cli login`
    token_file.parent.mkdir(parents=True)
    token_file.write_text("hf_cached_login_token")
    # a cached login does not count: a dry run reports no token, an upload refuses before any network call
    assert push_to_hub(carded, "prefflow-user/tiny-dpo", private=False, dry_run=True)["token_env"] is None
    with pytest.raises(PublishError, match="HF_TOKEN or HUGGING_FACE_HUB_TOKEN"):
        push_to_hub(carded, "prefflow-user/tiny-dpo", private=False, dry_run=False)


def test_upload_needs_a_card_and_the_network(trained, carded, hub_env, tmp_path):
    hub_env.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        push_to_hub(carded, "prefflow-user/tiny-dpo", private=True)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(PublishError, match="write the model card first"):
        upload_files(bare)
    with pytest.raises(PublishError, match="not a saved model directory"):
        upload_files(tmp_path / "nothing")


def test_repo_id_templates_and_the_start_of_run_check(hub_env):
    assert repo_id_for("me/prefflow-{variant}-{run_id}", "dpo", "17") == "me/prefflow-dpo-17"
    with pytest.raises(PublishError, match="placeholder"):
        repo_id_for("me/{model}", "dpo", "17")
    with pytest.raises(PublishError, match="same repo"):
        check_publish("me/prefflow", ["sft", "dpo"], dry_run=True)
    assert check_publish("me/prefflow-{variant}", ["sft", "dpo"], dry_run=True) == [
        "me/prefflow-sft",
        "me/prefflow-dpo",
    ]
    with pytest.raises(PublishError, match="before the run"):
        check_publish("me/prefflow-{variant}", ["dpo"], dry_run=False)
    hub_env.setenv("HUGGING_FACE_HUB_TOKEN", "hf_x")
    assert check_publish("me/prefflow-{variant}", ["dpo"], dry_run=False) == ["me/prefflow-dpo"]
