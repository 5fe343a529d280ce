"""The plan the command-line preflight checked, handed to ``start`` so that a normal run types its config once.

The preflight runs in the process that starts Metaflow, and Metaflow's local runtime starts ``start`` with that
process's environment. The preflight puts its plan (pickled, compressed) in ``PREFFLOW_CHECKED_PLAN`` together with
a digest of what the plan was made from: the config mapping, ``--set``, ``--loss`` and the sweep file's bytes.
``start`` takes the plan only when its own inputs have the same digest (a pure cache), and otherwise plans itself,
once: runs started without the preflight (Argo, Kubernetes pods, ``step``, ``resume`` of a run made with another
config) are checked there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pickle
import zlib
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from steps.config.plan import RunPlan, load_plan

logger = logging.getLogger(__name__)

#: The environment variable that carries the checked plan from the preflight to ``start``.
PLAN_VARIABLE = "PREFFLOW_CHECKED_PLAN"
#: A larger plan (a sweep of hundreds of points) is not handed on: ``start`` plans again. Linux allows 128 KiB
#: per environment string.
MAX_ENCODED_BYTES = 96 * 1024


def inputs_digest(data: Mapping, set_arg: str, loss_arg: str, sweep_path: str) -> str | None:
    """A digest of everything a plan is made from (None when it cannot be taken: start then plans itself).

    The config mapping is compared as JSON, the form Metaflow keeps a Config value in."""
    try:
        sweep = Path(sweep_path).read_bytes() if sweep_path else b""
        text = json.dumps([data, set_arg, loss_arg, sweep_path], sort_keys=True, allow_nan=True)
    except (OSError, TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode() + b"\0" + sweep).hexdigest()


def hand_to_start(
    plan: RunPlan, data: Mapping, parameters: Mapping[str, str], environ: MutableMapping[str, str] = os.environ
) -> bool:
    """Put ``plan`` where ``start`` finds it (whether it was handed on); ``parameters``: the flow's set/loss/sweep."""
    environ.pop(PLAN_VARIABLE, None)
    digest = inputs_digest(data, *(parameters.get(name, "") for name in ("set", "loss", "sweep")))
    if digest is None:
        return False
    encoded = base64.b64encode(zlib.compress(pickle.dumps((digest, plan)))).decode("ascii")
    if len(encoded) > MAX_ENCODED_BYTES:
        logger.info("the checked plan is %d bytes encoded: start will plan the run again", len(encoded))
        return False
    environ[PLAN_VARIABLE] = encoded
    return True


def _handed_plan(digest: str | None, environ: Mapping[str, str]) -> RunPlan | None:
    encoded = environ.get(PLAN_VARIABLE)
    if not encoded or digest is None:
        return None
    try:
        handed_digest, plan = pickle.loads(zlib.decompress(base64.b64decode(encoded)))
    except Exception as exc:  # a damaged or foreign value: plan from the inputs
        logger.warning("%s could not be read (%s): planning the run here", PLAN_VARIABLE, exc)
        return None
    return plan if handed_digest == digest and isinstance(plan, RunPlan) else None


def plan_for_start(
    data: Mapping,
    source: str,
    set_arg: str = "",
    loss_arg: str = "",
    sweep_path: str = "",
    environ: Mapping[str, str] = os.environ,
) -> RunPlan:
    """``start``'s plan: the preflight's when it checked these very inputs, else ``load_plan`` (the one check)."""
    plan = _handed_plan(inputs_digest(data, set_arg, loss_arg, sweep_path), environ)
    if plan is not None:
        logger.info("config: the plan the command-line preflight checked (%s), not typed again", plan.config.source)
        return plan
    return load_plan(data, source, set_arg, loss_arg, sweep_path)
