"""On-policy preference pairs: sample K answers per prompt from the policy, judge them, keep a clearly better and a
clearly worse one (`preftune pairs`).

    from preftune.onpolicy import PairsConfig, make_pairs
    make_pairs(PairsConfig(model="runs/sft/final", prompts="prompts.jsonl", judge="my_judges:score",
                           output="pairs.jsonl"))

Modules: config (PairsConfig), prompts (any file preftune reads), judges (the four judge kinds; reward_model,
endpoint), select (best-worst, best-random, all-pairs), pairs (the pipeline and its steps), store (files, resume,
several processes), summary.
"""

from __future__ import annotations

from typing import Any

from preftune.onpolicy.config import PairsConfig

__all__ = ["PairsConfig", "PairsResult", "make_pairs"]


def __getattr__(name: str) -> Any:
    # The pipeline imports torch and transformers; `preftune pairs --help` should not wait for them.
    if name in ("make_pairs", "PairsResult"):
        from preftune.onpolicy import pairs

        return getattr(pairs, name)
    raise AttributeError(f"module 'preftune.onpolicy' has no attribute {name!r}")
