"""On-policy preference rounds: sample answers from the policy being trained, score them with a judge, pair them,
train, repeat; every round's samples, judgements, pairs and stats are kept under its own directory.

The phases (each idempotent given its outputs): ``steps.onpolicy.sampling.sample_round``,
``steps.onpolicy.judging.judge_round``, ``steps.onpolicy.pairs.build_pairs``; ``steps.onpolicy.rounds`` runs
them in order. This package's top level imports only the config section (run configs are parsed everywhere).
"""

from __future__ import annotations

from steps.onpolicy.config import OnPolicyConfig

__all__ = ["OnPolicyConfig"]
