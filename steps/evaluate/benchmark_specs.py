"""What ``evaluation.benchmarks`` asks for: lm-evaluation-harness tasks run on every evaluated model (the alignment
tax beside AlpacaEval). Parsed and checked here without importing lm_eval, so a config is validated on machines
that do not have the optional ``benchmarks`` extra.

YAML shapes accepted, item by item::

    benchmarks:
      - ifeval                                   # a task, group or tag name with its defaults
      - {task: mmlu, num_fewshot: 5, limit: 50}  # with settings
      - {task: my_task, task_dir: tasks/}        # a task defined by a YAML file in a local directory
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

#: How generation tasks sample: ``run`` = PrefFlow's evaluation settings (temperature, top_p, max_new_tokens,
#: seed, stop tokens: the same as the AlpacaEval answers); ``task`` = the task YAML's own generation_kwargs
#: (the published setting, usually greedy; compare with public leaderboards this way).
GENERATION_MODES = ("run", "task")

#: lm_eval's ``<metric>,<filter>`` result keys (``acc,none``, ``exact_match,strict-match``).
METRIC_KEY = re.compile(r"^[^,\s]+,[^,\s]+$")


class BenchmarkSpecError(ValueError):
    """An ``evaluation.benchmarks`` entry that cannot work; ``field`` is its key relative to the section
    (``benchmarks[1].num_fewshot``), so config errors come out at the full dotted key."""

    def __init__(self, message: str, field: str = "benchmarks") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class BenchmarkSpec:
    """One lm-evaluation-harness task (or group such as ``mmlu``, or tag) to run on each model.

    ``num_fewshot``: None keeps the task's default. ``limit``: evaluate only the first N documents of each task
    (of each subtask for a group): smoke runs only, the score is then not comparable. ``metric``: the headline
    ``<metric>,<filter>`` key (None: the task's first metric and filter). ``chat_template``: prompts go through the
    model's chat template, as the AlpacaEval prompts do. ``generation``: one of :data:`GENERATION_MODES`.
    ``task_dir``: a directory of task YAML files to index besides lm_eval's own (a local task wins on a name
    clash).
    """

    task: str
    num_fewshot: int | None = None
    limit: int | None = None
    metric: str | None = None
    chat_template: bool = True
    generation: str = "run"
    task_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task.strip() or self.task.strip() != self.task:
            raise BenchmarkSpecError(f"task must be a task name like 'mmlu', got {self.task!r}", "task")
        for name, least in (("num_fewshot", 0), ("limit", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise BenchmarkSpecError(f"{name} must be an integer >= {least} or null, got {value!r}", name)
        if self.metric is not None and (not isinstance(self.metric, str) or not METRIC_KEY.match(self.metric)):
            raise BenchmarkSpecError(
                f"metric must be lm_eval's '<metric>,<filter>' key, e.g. 'acc,none' or 'exact_match,strict-match', "
                f"got {self.metric!r}",
                "metric",
            )
        if not isinstance(self.chat_template, bool):
            raise BenchmarkSpecError(
                f"chat_template must be true or false, got {self.chat_template!r}", "chat_template"
            )
        if self.generation not in GENERATION_MODES:
            raise BenchmarkSpecError(
                f"generation must be one of {', '.join(GENERATION_MODES)} (run: PrefFlow's evaluation sampling "
                f"settings; task: the task's own), got {self.generation!r}",
                "generation",
            )
        if self.task_dir is not None and (not isinstance(self.task_dir, str) or not self.task_dir.strip()):
            raise BenchmarkSpecError(f"task_dir must be a directory path or null, got {self.task_dir!r}", "task_dir")

    def record(self) -> dict[str, Any]:
        return asdict(self)


_SPEC_KEYS = tuple(f.name for f in fields(BenchmarkSpec))


def _spec_from_item(item: Any, index: int) -> BenchmarkSpec:
    where = f"benchmarks[{index}]"
    if isinstance(item, BenchmarkSpec):
        return item
    if isinstance(item, str):
        item = {"task": item.strip()}
    if not isinstance(item, Mapping):
        raise BenchmarkSpecError(
            f"got {item!r}; expected a task name (e.g. ifeval) or a mapping with keys {', '.join(_SPEC_KEYS)}", where
        )
    for key in item:
        if key not in _SPEC_KEYS:
            close = difflib.get_close_matches(str(key), _SPEC_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BenchmarkSpecError(f"unknown key{hint}; allowed keys: {', '.join(_SPEC_KEYS)}", f"{where}.{key}")
    if "task" not in item:
        raise BenchmarkSpecError("missing; name the lm_eval task, e.g. task: mmlu", f"{where}.task")
    try:
        return BenchmarkSpec(**dict(item))
    except BenchmarkSpecError as exc:
        raise BenchmarkSpecError(str(exc), f"{where}.{exc.field}") from None


def parse_benchmarks(value: Any) -> list[BenchmarkSpec]:
    """The typed benchmark list from the config's ``evaluation.benchmarks`` (names, mappings or specs; a
    comma-separated string from ``--set`` works too). Raises :class:`BenchmarkSpecError` naming the entry and key."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, Sequence):
        raise BenchmarkSpecError(f"got {value!r}; expected a list of lm_eval task names or mappings")
    specs = [_spec_from_item(item, index) for index, item in enumerate(value)]
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.task in seen:
            raise BenchmarkSpecError(
                f"task {spec.task!r} is listed twice (also benchmarks[{seen[spec.task]}]); each task has one row "
                "column, so list it once",
                f"benchmarks[{index}].task",
            )
        seen[spec.task] = index
    return specs
