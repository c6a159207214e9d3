"""On-policy preference pairs: sample K answers per prompt from the policy, judge them, keep a clearly better and a
clearly worse one (`preftune pairs`).

    from preftune.onpolicy import PairsConfig, make_pairs
    make_pairs(PairsConfig(model="runs/sft/final", prompts="prompts.jsonl", judge="my_judges:score",
                           output="pairs.jsonl"))
    iterate(IterateConfig(model="runs/sft/final", prompts="prompts.jsonl", judge="my_judges:score", rounds=3,
                          output_dir="runs/iterate"))             # `preftune iterate`: rounds of pairs → DPO

Modules: config (PairsConfig), prompts (any file preftune reads), judges (the four judge kinds; reward_model,
endpoint), select (best-worst, best-random, all-pairs), pairs (the pipeline and its steps), store (files, resume,
several processes), summary; iterate_run (`preftune iterate`, rounds of iterative DPO) with iterate_config, iterate_store,
iterate_eval, iterate_table and collapse.
"""

from __future__ import annotations

from typing import Any

from preftune.onpolicy.config import PairsConfig
from preftune.onpolicy.iterate_config import IterateConfig

__all__ = ["IterateConfig", "IterateResult", "PairsConfig", "PairsResult", "iterate", "make_pairs"]


def __getattr__(name: str) -> Any:
    # The pipeline imports torch and transformers; `preftune pairs --help` should not wait for them.
    if name in ("make_pairs", "PairsResult"):
        from preftune.onpolicy import pairs

        return getattr(pairs, name)
    if name in ("iterate", "IterateResult"):
        from preftune.onpolicy import iterate_run

        return getattr(iterate_run, name)
    raise AttributeError(f"module 'preftune.onpolicy' has no attribute {name!r}")
