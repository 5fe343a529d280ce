"""The ``preference.on_policy`` section, defined with the other config sections (steps.config.onpolicy, so that the
config package imports no other package of steps while it loads); here under its library's name."""

from __future__ import annotations

from steps.config.onpolicy import FORBIDDEN_PROMPT_SOURCES, PAIRINGS, REWARD_MODEL_PREFIX, OnPolicyConfig

__all__ = ["FORBIDDEN_PROMPT_SOURCES", "PAIRINGS", "REWARD_MODEL_PREFIX", "OnPolicyConfig"]
