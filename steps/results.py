"""Typed step results: what a training step hands to the next steps, the report and the model card.

A :class:`TrainResult` is the ``sft_summary`` / ``train_summary`` artifact of flows/pipeline.py (read it with the
Client API: ``Run(...)['sft'].task.data.sft_summary.model_dir``). Across the torchrun boundary (global rank 0 writes
it, the launching step reads it) it travels as JSON through one pair: :meth:`TrainResult.to_dict` and
:meth:`TrainResult.from_dict`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from steps.config import PreferenceConfig, SFTConfig, config_to_dict, load_section


@dataclass(frozen=True)
class TrainResult:
    """One finished training run (SFT or a preference loss) as global rank 0 saw it."""

    kind: str  # "sft" or the loss name
    model_dir: str  # the model handed on (merged, or the adapter with lora.hand_on: adapter)
    init: str  # the model spec training started from
    init_label: str  # what the results table shows: "SFT checkpoint" or "base: <spec>"
    reference: str | None  # the reference model's spec (None: no reference model)
    config: SFTConfig | PreferenceConfig  # the training section this run trained with (preference: resolved)
    steps: int  # optimizer steps
    elapsed_s: float
    tokens_per_s: float
    final_train: dict[str, Any]  # the last optimizer step's record (metrics.jsonl)
    final_dev: dict[str, Any]  # the last dev evaluation's record
    data_stats: dict[str, Any]  # {"train": LengthStats, "dev": LengthStats} as plain values
    metrics_path: str
    resumed_from: str | None = None  # the checkpoint this attempt resumed from
    precision: str = ""  # e.g. "bfloat16 compute, float32 master weights (cuda)"
    world_size: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)  # every optimizer step's record
    dev_history: list[dict[str, Any]] = field(default_factory=list)  # every dev evaluation's record
    layout: dict[str, Any] = field(default_factory=dict)  # parallel.last_layout(): parallelism, world, nodes, mesh
    load_memory: dict[str, Any] = field(default_factory=dict)  # parallel.last_load_memory(): per-rank host RSS

    @property
    def loss_beta(self) -> float | None:
        """The loss's beta (its implicit-reward scale) where the loss has one; None for SFT and for losses without
        (ORPO): the held-out reward metrics scale by it."""
        loss_config = self.config.criterion_config if isinstance(self.config, PreferenceConfig) else None
        beta = getattr(loss_config, "beta", None)
        return None if beta is None else float(beta)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the training section as its YAML mapping); :meth:`from_dict` reads it back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["config"] = config_to_dict(self.config)
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "<train result>") -> TrainResult:
        """A result from :meth:`to_dict`'s mapping (rank 0's summary file, or the plain dict an earlier PrefFlow
        stored as its artifact): the training section typed as the config loader types it; ValueError naming
        ``source`` for a key this class does not know or a missing one."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - set(fields))
        missing = [
            name
            for name, f in fields.items()
            if name not in doc and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if unknown or missing:
            raise ValueError(
                f"{source}: not a training result (unknown keys {unknown}, missing keys {missing}); it is written "
                "by steps.results.TrainResult.to_dict"
            )
        section = "sft" if doc["kind"] == "sft" else "preference"
        values = {name: doc[name] for name in fields if name in doc}
        values["config"] = load_section({section: doc["config"]}, section, source)
        return cls(**values)
