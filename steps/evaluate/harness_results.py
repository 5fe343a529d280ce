"""Reading lm_eval's results: the headline metric of each benchmark with its standard error, and what makes the
number reproducible (lm_eval version, task versions, config and data hashes, n-shot, limit). Pure functions over
the dict ``lm_eval.simple_evaluate`` returns; no lm_eval import."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from steps.evaluate.benchmark_specs import METRIC_KEY, BenchmarkSpec

#: Metric names whose values are rates in [0, 1]; report columns show them in percent.
PERCENT_METRIC_PREFIXES = ("acc", "exact_match", "prompt_level_", "inst_level_", "pass@", "mc1", "mc2")


class BenchmarkResultError(ValueError):
    """lm_eval's results lack what a benchmark entry asks for (e.g. a ``metric`` key the task does not report)."""


def _sha256_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _number(value: Any) -> float | None:
    """A metric value as a float, or None for lm_eval's ``"N/A"`` (no standard error) and non-finite numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_values(task_result: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{"acc,none": {"value": .., "stderr": ..}, ...}`` from one entry of lm_eval's ``results``; lm_eval spells
    the standard error of ``<metric>,<filter>`` as ``<metric>_stderr,<filter>``."""
    out: dict[str, dict[str, float | None]] = {}
    for key, value in task_result.items():
        if not METRIC_KEY.match(key) or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        out[key] = {"value": _number(value), "stderr": _number(task_result.get(f"{metric}_stderr,{filter_name}"))}
    return out


def default_metric_key(task_config: Mapping[str, Any] | None, reported: Sequence[str]) -> str | None:
    """The task's first metric under its first filter (``metric_list[0]``, ``filter_list[0]``, else ``none``) when
    reported; for a group (no leaf config) or anything else, the first reported key."""
    if task_config:
        metrics = task_config.get("metric_list") or []
        filters = task_config.get("filter_list") or []
        if metrics and isinstance(metrics[0], Mapping):
            first_filter = filters[0].get("name", "none") if filters and isinstance(filters[0], Mapping) else "none"
            key = f"{metrics[0].get('metric')},{first_filter}"
            if key in reported:
                return key
    return reported[0] if reported else None


def leaf_tasks(raw: Mapping[str, Any], name: str) -> list[str]:
    """The tasks lm_eval actually ran for ``name``: its subtasks, recursively, for a group; itself otherwise."""
    subtasks = raw.get("group_subtasks", {}) or {}
    if name not in subtasks:
        return [name]
    leaves: list[str] = []
    for child in subtasks[name]:
        leaves.extend(leaf_tasks(raw, child))
    return leaves


def samples_sha256(samples: Sequence[Mapping[str, Any]]) -> str:
    """One hash of every evaluated document, prompt and target (lm_eval's per-sample hashes, in doc order): two
    runs with the same value saw the same data, prompts and few-shot examples."""
    ordered = sorted(samples, key=lambda s: (str(s.get("filter")), int(s.get("doc_id", 0))))
    parts = (f"{s.get('doc_hash')}{s.get('prompt_hash')}{s.get('target_hash')}" for s in ordered)
    return hashlib.sha256("".join(parts).encode("utf-8")).hexdigest()


def is_percent_metric(key: str) -> bool:
    return key.split(",", 1)[0].startswith(PERCENT_METRIC_PREFIXES)


def summarize_benchmark(
    spec: BenchmarkSpec,
    raw: Mapping[str, Any],
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
    generation_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """The headline score of ``spec.task`` and its provenance from one ``simple_evaluate`` result ``raw`` (without
    its samples, passed apart). ``generation_kwargs``: what each generating leaf task sampled with."""
    results = raw.get("results", {})
    if spec.task not in results:
        raise BenchmarkResultError(f"benchmark {spec.task!r}: lm_eval reported no result under that name")
    configs = raw.get("configs", {})
    metrics = metric_values(results[spec.task])
    key = spec.metric or default_metric_key(configs.get(spec.task), list(metrics))
    if key is None or key not in metrics:
        raise BenchmarkResultError(
            f"benchmark {spec.task!r}: metric {key!r} is not among those lm_eval reported ({', '.join(metrics)}); "
            "set its metric to one of them"
        )
    leaves = leaf_tasks(raw, spec.task)
    counts = raw.get("n-samples", {})
    all_samples = [dict(s, task=leaf) for leaf in leaves for s in samples.get(leaf, [])]
    return {
        "task": spec.task,
        "metric": key,
        "value": metrics[key]["value"],
        "stderr": metrics[key]["stderr"],
        "percent": is_percent_metric(key),
        "higher_is_better": raw.get("higher_is_better", {}).get(spec.task, {}).get(key.split(",", 1)[0]),
        "n": sum(int(counts.get(leaf, {}).get("effective", 0)) for leaf in leaves),
        "n_total": sum(int(counts.get(leaf, {}).get("original", 0)) for leaf in leaves),
        "num_fewshot": raw.get("n-shot", {}).get(spec.task),
        "limit": spec.limit,
        "version": raw.get("versions", {}).get(spec.task),
        "leaf_versions": {leaf: raw.get("versions", {}).get(leaf) for leaf in leaves},
        "config_sha256": _sha256_json({leaf: configs.get(leaf) for leaf in leaves}),
        "samples_sha256": samples_sha256(all_samples),
        "output_types": sorted({str(configs.get(leaf, {}).get("output_type")) for leaf in leaves}),
        "generation_kwargs": dict(generation_kwargs),
        "spec": spec.record(),
        "metrics": metrics,
    }


def compact_samples(benchmark: str, task: str, samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-document lines for ``lm_eval_samples.jsonl`` (``task`` is a leaf of the listed ``benchmark``): the answer
    (or choice log-likelihoods), target, metric values and hashes; lm_eval's full few-shot prompts are left out
    (mmlu's would be tens of MB)."""
    rows = []
    for sample in samples:
        metric_names = sample.get("metrics", [])
        rows.append(
            {
                "benchmark": benchmark,
                "task": task,
                "doc_id": sample.get("doc_id"),
                "filter": sample.get("filter"),
                "target": sample.get("target"),
                "response": sample.get("filtered_resps"),
                "scores": {name: sample.get(name) for name in metric_names},
                "doc_hash": sample.get("doc_hash"),
                "prompt_hash": sample.get("prompt_hash"),
            }
        )
    return rows


def row_fields(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """Columns for a results row: ``<task>`` (percent for rates) and ``<task>_se``, per benchmark of a
    :func:`steps.evaluate.harness.run_benchmarks` summary."""
    out: dict[str, float | None] = {}
    for task, entry in summary.get("benchmarks", {}).items():
        scale = 100.0 if entry.get("percent") else 1.0
        value, stderr = entry.get("value"), entry.get("stderr")
        out[task] = None if value is None else value * scale
        out[f"{task}_se"] = None if stderr is None else stderr * scale
    return out


def format_score(entry: Mapping[str, Any], digits: int = 1) -> str:
    """``45.2 ± 0.4`` (rates in percent), ``45.2`` without a standard error, ``n/a`` without a value."""
    scale = 100.0 if entry.get("percent") else 1.0
    value, stderr = entry.get("value"), entry.get("stderr")
    if value is None:
        return "n/a"
    text = f"{value * scale:.{digits}f}"
    return text if stderr is None else f"{text} ± {stderr * scale:.{digits}f}"
