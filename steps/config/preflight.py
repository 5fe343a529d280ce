"""Check a flows/pipeline.py command line before Metaflow starts: one line on stderr and exit code 2 on error.

Metaflow's Config parser only sees the file's text, so this is where errors can name the file."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from steps.config.checked_plan import hand_to_start
from steps.config.convert import ConfigError
from steps.config.convert import logger as _notes_logger
from steps.config.loading import DEFAULT_CONFIG_PATH, parse_yaml_text, read_config_text
from steps.config.plan import RunPlan, load_plan
from steps.train.gang import worker_python_problem

#: Commands that start or deploy work; others (``step`` in task subprocesses, ``logs``, ``dump``...) are skipped.
WORK_COMMANDS = {"run", "resume", "show", "check", "spin", "argo-workflows", "step-functions", "airflow"}
#: Commands that run the flow's tasks on this machine (a local gang's other nodes among them).
LOCAL_RUN_COMMANDS = {"run", "resume"}
#: Metaflow's top-level options that take a value (``--config`` and ``--config-value`` take two).
VALUE_OPTIONS = {
    "--metadata",
    "--environment",
    "--datastore",
    "--datastore-root",
    "--package-suffixes",
    "--with",
    "--event-logger",
    "--monitor",
    "--mode",
    "--branch",
}
PARAMETERS = ("loss", "set", "sweep")
CONFIG_NAME = "config"
EXIT_BAD_INPUT = 2
#: The logger of config notes (steps.config.convert.note).
NOTES_LOGGER = _notes_logger.name
#: Metaflow's order of user-name sources; "root" does not count.
USER_VARIABLES = ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")


@dataclass
class CommandLine:
    """What the preflight needs from argv: the command, the config (file or inline text) and the parameters."""

    command: str | None = None
    config_file: str | None = None
    config_text: str | None = None  # from --config-value config TEXT
    parameters: dict[str, str] = field(default_factory=dict)
    internal: bool = False  # a task subprocess or --help: nothing to check
    decorators: list[str] = field(default_factory=list)  # --with SPEC


def read_command_line(argv: Sequence[str]) -> CommandLine:
    line, args, i = CommandLine(), list(argv), 0
    while i < len(args):
        arg = args[i]
        if arg in ("--help", "-h") or arg == "--local-config-file" or arg.startswith("--local-config-file="):
            line.internal = True
        if line.command is None:
            if arg in ("--config", "--config-value"):
                name, value = (args[i + 1 : i + 3] + [None, None])[:2]
                if name != CONFIG_NAME or value is None:
                    given = " ".join(a for a in (arg, name, value) if a)
                    example = f" (here: --config config {name})" if name and name != CONFIG_NAME else ""
                    hint = (
                        f"name the config first: use --config config FILE{example}"
                        if arg == "--config"
                        else "use --config-value config TEXT"
                    )
                    raise ConfigError(arg, "", f"got '{given}'; {hint}")
                if arg == "--config":
                    line.config_file = value
                else:
                    line.config_text = value
                i += 3
                continue
            if arg in VALUE_OPTIONS:
                if arg == "--with" and i + 1 < len(args):
                    line.decorators.append(args[i + 1])
                i += 2
                continue
            if not arg.startswith("-"):
                line.command = arg
        else:
            name = arg[2:].partition("=")[0] if arg.startswith("--") else ""
            if name in PARAMETERS:
                if "=" in arg:
                    line.parameters[name] = arg.partition("=")[2]
                elif i + 1 < len(args):
                    line.parameters[name] = args[i + 1]
                    i += 1
        i += 1
    return line


@dataclass
class Checked:
    """What the preflight checked: the plan, and the config mapping and parameters it was made from."""

    plan: RunPlan
    data: dict
    parameters: dict[str, str]
    command: str


def check_command_line(argv: Sequence[str], default_config: str | Path = DEFAULT_CONFIG_PATH) -> Checked | None:
    """Raise ConfigError for what ``start`` would reject: the config, ``--set``, ``--loss`` and ``--sweep``, and
    for a local gang whose other nodes would not run this interpreter. What was checked (None: nothing to check)."""
    line = read_command_line(argv)
    if line.internal or line.command not in WORK_COMMANDS:
        return None
    if line.config_text is not None:
        source = "--config-value config"
        data = parse_yaml_text(line.config_text, source)
    else:
        source = str(line.config_file or default_config)
        data = parse_yaml_text(read_config_text(source), source)
    p = line.parameters
    plan = load_plan(data, source, p.get("set", ""), p.get("loss", ""), p.get("sweep", ""))
    problem = local_gang_problem(line, plan)
    if problem:
        raise ConfigError("", "resources.num_nodes", f"is {plan.config.resources.num_nodes}: {problem}")
    return Checked(plan, data, dict(p), str(line.command))


def local_gang_problem(line: CommandLine, plan: RunPlan) -> str | None:
    """Why this command's gang steps would hang on this machine: Metaflow starts a local gang's other nodes as
    ``python`` from PATH (the flow's entry puts its own interpreter's directory first where it can)."""
    resources = plan.config.resources
    on_pods = resources.kubernetes or any(spec.split(":")[0] == "kubernetes" for spec in line.decorators)
    if line.command not in LOCAL_RUN_COMMANDS or resources.num_nodes < 2 or on_pods:
        return None
    return worker_python_problem(os.environ)


class _HeldNotes(logging.Handler):
    """Config notes held back while the command line is checked: an error is then the only line printed."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def preflight(argv: Sequence[str], default_config: str | Path = DEFAULT_CONFIG_PATH) -> int:
    """0 when the command line may start (config notes are logged then, and the checked plan is handed to
    ``start``: steps.config.checked_plan); else prints one ``error: FILE: KEY: ...`` line and returns 2."""
    notes, held = logging.getLogger(NOTES_LOGGER), _HeldNotes()
    propagate, notes.propagate = notes.propagate, False
    notes.addHandler(held)
    try:
        checked = check_command_line(argv, default_config)
    except ConfigError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        notes.removeHandler(held)
        notes.propagate = propagate
    for record in held.records:
        notes.handle(record)
    if checked is not None and checked.command in LOCAL_RUN_COMMANDS:  # start takes it instead of typing again
        hand_to_start(checked.plan, checked.data, checked.parameters)
    return 0


def ensure_user_name(default: str = "prefflow") -> str:
    """The user name Metaflow will use, setting ``USERNAME`` to ``default`` when no variable gives one."""
    for variable in USER_VARIABLES:
        value = os.environ.get(variable)
        if value and value != "root":
            return value
    os.environ["USERNAME"] = default
    return default
