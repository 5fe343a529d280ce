"""fairseq2's model names in PrefFlow configs: model asset names -> Hugging Face ids, checkpoint names -> the SFT
model (its loss names are in steps.config.fairseq2_losses)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steps.config.convert import ConfigError, did_you_mean, join_key, short

#: fairseq2's model asset cards (fairseq2/assets/cards/models/llama.yaml) and the Hugging Face repositories of the
#: same weights.
MODEL_IDS = {
    "llama2_7b": "meta-llama/Llama-2-7b-hf",
    "llama2_7b_chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama2_13b": "meta-llama/Llama-2-13b-hf",
    "llama2_13b_chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama2_70b": "meta-llama/Llama-2-70b-hf",
    "llama2_70b_chat": "meta-llama/Llama-2-70b-chat-hf",
    "llama3_8b": "meta-llama/Meta-Llama-3-8B",
    "llama3_8b_instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3_70b": "meta-llama/Meta-Llama-3-70B",
    "llama3_70b_instruct": "meta-llama/Meta-Llama-3-70B-Instruct",
    "llama3_1_8b": "meta-llama/Llama-3.1-8B",
    "llama3_1_8b_instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3_1_70b": "meta-llama/Llama-3.1-70B",
    "llama3_1_70b_instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama3_2_1b": "meta-llama/Llama-3.2-1B",
    "llama3_2_1b_instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3_2_3b": "meta-llama/Llama-3.2-3B",
    "llama3_2_3b_instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3_3_70b_instruct": "meta-llama/Llama-3.3-70B-Instruct",
    "r1_distilled_llama3_1_8b_instruct": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
}
#: fairseq2's names for a checkpoint of the run before (the SFT run, in the guide's recipes).
CHECKPOINT_NAME = re.compile(r"^(checkpoint_step_\d+|last_checkpoint)$")
#: The spec of the SFT model in ``preference.init`` / ``preference.reference``.
SFT = "sft"


def model_spec(value: Any, key: str) -> tuple[str, str]:
    """(PrefFlow model spec, what was done) for a fairseq2 model reference: an asset name, ``{name: ...}`` (2025),
    a checkpoint name (the SFT model, ``sft``), or a Hugging Face id / local path (kept)."""
    if isinstance(value, Mapping):
        if "name" not in value:
            raise ConfigError("", key, f"got {short(value)}; expected a model name or {{name: ...}}")
        value = value["name"]
        key = join_key(key, "name")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("", key, f"got {short(value)}; expected a fairseq2 model name (e.g. llama3_1_8b)")
    name = value.strip()
    if CHECKPOINT_NAME.match(name):
        return SFT, (
            f"{name!r} is a checkpoint of fairseq2's SFT run: here the SFT model this run trains first ('sft')"
        )
    if name.split("@")[0] in MODEL_IDS:  # llama3_1_8b@user: a user's own card for the same weights
        hf_id = MODEL_IDS[name.split("@")[0]]
        return hf_id, f"fairseq2 asset {name!r} is Hugging Face {hf_id!r}"
    if "/" in name or name.startswith((".", "~")):
        return name, f"{name!r} is kept as a model spec (a Hugging Face id or a local Hugging Face directory)"
    raise ConfigError(
        "",
        key,
        f"fairseq2 model {name!r} has no known Hugging Face id{did_you_mean(name, MODEL_IDS)}; known: "
        f"{', '.join(MODEL_IDS)}, checkpoint_step_N; or give a Hugging Face id",
    )


def reference_spec(fairseq2_field: str, value: Any, key: str) -> tuple[str, str]:
    """The preference section's ``reference`` for fairseq2's ``reference_model`` (null: scores in the data)."""
    if value is None:
        return "auto", (
            "null: fairseq2 reads reference_score_chosen/rejected from the data; PrefFlow uses those scores when "
            "every pair has them, and otherwise scores the reference it resolves (auto: the init model)"
        )
    return model_spec(value, join_key(key, fairseq2_field))


#: The run config's model specs, (section, key); per_loss entries' init and reference too.
MODEL_KEYS = (("model", "base"), ("sft", "init"), ("preference", "init"), ("preference", "reference"))


def _refuse_checkpoint(value: Any, key: str) -> None:
    if isinstance(value, str) and CHECKPOINT_NAME.match(value.strip()) and not Path(value.strip()).is_dir():
        raise ConfigError(
            "",
            key,
            f"{value!r} names a fairseq2 checkpoint of an earlier run, which PrefFlow cannot load: give that "
            "checkpoint's Hugging Face directory (`python -m steps.config from-fairseq2 RECIPE --sft-model DIR` "
            "writes it in)",
        )


def refuse_checkpoint_names(data: Mapping) -> None:
    """ConfigError at the first model spec of a config mapping that is a fairseq2 checkpoint name (what the import
    of a lone preference recipe leaves for the user to replace), unless a directory of that name exists here."""
    for section, key in MODEL_KEYS:
        node = data.get(section)
        if isinstance(node, Mapping):
            _refuse_checkpoint(node.get(key), f"{section}.{key}")
    preference = data.get("preference")
    per_loss = preference.get("per_loss") if isinstance(preference, Mapping) else None
    for loss, entry in per_loss.items() if isinstance(per_loss, Mapping) else ():
        for key in ("init", "reference"):
            if isinstance(entry, Mapping):
                _refuse_checkpoint(entry.get(key), f"preference.per_loss.{loss}.{key}")
