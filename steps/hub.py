"""Upload a trained model directory (weights, tokenizer, model card) to the Hugging Face Hub.

The token comes only from HF_TOKEN / HUGGING_FACE_HUB_TOKEN; a dry run checks everything without the network."""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path
from typing import Any

from steps.model_card import CARD_FILE

logger = logging.getLogger(__name__)

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
#: Never uploaded: PrefFlow's completion marker, checkpoints and optimizer state, hidden and temporary files.
EXCLUDE = ("COMPLETE", "checkpoints/*", "optimizer*", "scheduler*", "*.tmp", ".*", "*/.*")


class PublishError(ValueError):
    """A model directory, repo id or environment that cannot be published as asked (with the fix)."""


def check_repo_id(repo_id: str) -> str:
    """``owner/name`` as the Hub accepts it; PublishError naming the rule otherwise (no network)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PublishError(
            f"push_to_hub.repo_id: got {repo_id!r}; give 'owner/name' (your user or organisation, then the model)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PublishError(f"push_to_hub.repo_id: {exc}") from exc
    return repo_id


def repo_id_for(template: str, variant: str, run_id: str) -> str:
    """``push_to_hub.repo_id`` for one variant: ``{variant}`` and ``{run_id}`` filled in, then checked."""
    try:
        repo_id = template.format(variant=variant, run_id=run_id)
    except (KeyError, IndexError, ValueError) as exc:
        raise PublishError(
            f"push_to_hub.repo_id: {template!r} has a placeholder other than {{variant}} and {{run_id}} ({exc})"
        ) from exc
    return check_repo_id(repo_id)


def check_publish(template: str, variants: list[str], *, dry_run: bool) -> list[str]:
    """Before any training: one valid, distinct repo id per variant, and a token unless this is a dry run."""
    repo_ids = [repo_id_for(template, v, "0") for v in variants]
    if len(set(repo_ids)) < len(repo_ids):
        raise PublishError(
            f"push_to_hub.repo_id: {template!r} gives the same repo for variants {', '.join(variants)}; add "
            f"{{variant}} (e.g. 'owner/prefflow-{{variant}}') or list one variant in push_to_hub.variants"
        )
    if not dry_run and hub_token() is None:
        raise PublishError(
            f"push_to_hub: no Hugging Face token in the environment; set {' or '.join(TOKEN_ENV_VARS)} before the "
            f"run (or push_to_hub.dry_run: true)"
        )
    return repo_ids


def hub_token() -> tuple[str, str] | None:
    """``(token, variable name)`` from the environment, or None. Never the cached login: what the job uses is
    what its environment says."""
    for name in TOKEN_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    return None


def _excluded(relative: str) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in EXCLUDE)


def upload_files(model_dir: str | Path) -> list[dict[str, Any]]:
    """What an upload sends: ``[{"path", "bytes"}]`` relative to ``model_dir``, sorted."""
    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise PublishError(f"{root}: not a saved model directory (no config.json); pass a trained model_dir")
    if not (root / CARD_FILE).is_file():
        raise PublishError(f"{root}: no {CARD_FILE}; write the model card first (steps.model_card.write_model_card)")
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not _excluded(relative):
            files.append({"path": relative, "bytes": path.stat().st_size})
    return files


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool, *, dry_run: bool = False) -> dict[str, Any]:
    """Create ``repo_id`` (private unless ``private`` is False; kept as it is when it exists) and upload the model
    directory in one commit. ``dry_run``: the same checks and file list, no network and nothing uploaded.

    Returns ``{"repo_id", "private", "dry_run", "files", "total_bytes", "token_env", "url"}`` plus ``"commit"``
    after a real upload. The token's value is never returned or logged.
    """
    repo_id = check_repo_id(repo_id)
    files = upload_files(model_dir)
    token = hub_token()
    if token is None and not dry_run:  # a dry run says whether a token is there; only an upload needs it
        raise PublishError(
            f"push_to_hub: no Hugging Face token in the environment; set {' or '.join(TOKEN_ENV_VARS)} to a token "
            f"with write access (https://huggingface.co/settings/tokens)"
        )
    plan: dict[str, Any] = {
        "repo_id": repo_id,
        "private": bool(private),
        "dry_run": dry_run,
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "token_env": token[1] if token else None,
        "url": f"https://huggingface.co/{repo_id}",
    }
    if dry_run:
        logger.info(
            "dry run: would upload %d files (%.1f MB) from %s to %s (%s), token from %s",
            len(files),
            plan["total_bytes"] / 1e6,
            model_dir,
            repo_id,
            "private" if private else "public",
            token[1] if token else "nowhere (an upload would need HF_TOKEN)",
        )
        return plan
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise PublishError("push_to_hub: HF_HUB_OFFLINE is set; unset it to upload, or use a dry run")
    from huggingface_hub import HfApi

    assert token is not None
    api = HfApi(token=token[0])
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(model_dir),
        allow_patterns=[f["path"] for f in files],
        commit_message=f"Upload PrefFlow model ({len(files)} files)",
    )
    plan["commit"] = getattr(commit, "oid", None)
    plan["url"] = getattr(commit, "commit_url", None) or plan["url"]
    logger.info("uploaded %d files from %s to %s", len(files), model_dir, plan["url"])
    return plan
