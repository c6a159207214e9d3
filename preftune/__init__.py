"""preftune: preference fine-tuning (DPO and its family) for causal language models.

    from preftune import TrainConfig, train, sft
    result = train(TrainConfig(model="path/to/sft-model", data="prefs.jsonl", output_dir="runs/dpo"))
"""

from __future__ import annotations

from typing import Any

from preftune.config import TrainConfig
from preftune.errors import PreftuneError
from preftune.version import __version__

__all__ = ["PreftuneError", "RunResult", "TrainConfig", "__version__", "iterate", "sft", "train"]


def __getattr__(name: str) -> Any:
    # The training stack imports torch and transformers; `preftune --help` and config checks should not wait for them.
    if name in ("train", "sft", "RunResult"):
        from preftune import recipe

        return getattr(recipe, name)
    if name == "iterate":
        from preftune.onpolicy.iterate_run import iterate

        return iterate
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
