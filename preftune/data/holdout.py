"""Which records evaluate, decided in one place: another source (`eval_data`, or its `eval_split`), another
split of the training source (`eval_split`), a share of the training records (`eval_fraction`), or none.

A held-out share takes whole prompt groups (pairs sharing a prompt would leak it into eval otherwise), in the
order of a hash of (seed, prompt): the choice depends neither on the record order nor on Python's hash salt, and
it is computed while the data streams, from one small rank per record (`prompt_ranks`), without holding the
records. The config refuses eval_split together with eval_fraction; with eval_data, eval_fraction is moot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from preftune.data.stats import value_key
from preftune.errors import PreftuneError


@dataclass(frozen=True)
class HoldOut:
    """A run's eval settings (TrainConfig's keys of the same names) and what they mean."""

    data: Any
    eval_data: Any = None
    eval_split: str | None = None
    eval_fraction: float = 0.0
    seed: int = 0

    @property
    def source(self) -> Any:
        """The source the eval split is read from (eval_data, or data for an eval_split of it), or None."""
        return (self.eval_data or self.data) if (self.eval_data or self.eval_split) else None

    @property
    def fraction(self) -> float:
        """The share of `data`'s records held out for evaluation (0: none)."""
        return self.eval_fraction if self.eval_fraction > 0 and not self.eval_data else 0.0

    @property
    def rank_seed(self) -> int | None:
        """The seed of the records' hold-out ranks, None when nothing is held out (no ranks needed)."""
        return self.seed if self.fraction else None

    def ingredients(self, fingerprint: Callable[[Any], Any]) -> dict[str, Any]:
        """What the eval split depends on, for the data cache's key (`fingerprint`: of a source's files)."""
        source = self.source
        return {"eval_data": fingerprint(source) if source else None, "eval_split": self.eval_split,
                "eval_fraction": self.fraction, "seed": self.rank_seed}

    def split(self, ranks: np.ndarray) -> tuple[np.ndarray, str]:
        """Which records (by their `prompt_ranks`) are held out, as a mask, and the line that says how many."""
        in_eval = held_out(ranks, self.fraction)
        return in_eval, (f"held out {int(in_eval.sum()):,} of {len(ranks):,} for evaluation "
                         f"(eval_fraction {self.eval_fraction})")


def group_rank(key: str, seed: int) -> bytes:
    """Where a prompt group (`value_key` of its prompt) comes in the hold-out order: a hash of (seed, prompt),
    independent of the record order and of Python's hash salt."""
    return hashlib.sha256(f"{seed}\x00{key}".encode("utf-8", "surrogatepass")).digest()


def prompt_ranks(records: Sequence[dict], seed: int) -> bytes:
    """The records' `group_rank`s, 32 bytes each, in record order (`np.frombuffer(..., dtype="S32")` reads them)."""
    return b"".join(group_rank(value_key(r["prompt"]), seed) for r in records)


def held_out(ranks: np.ndarray, eval_fraction: float) -> np.ndarray:
    """The records held out (a mask), from each record's prompt rank: whole prompt groups in rank order, each taken
    while it fits into round(eval_fraction × records) (at least 1); if none fits, the smallest; never all."""
    groups, group_of, sizes = np.unique(ranks, return_inverse=True, return_counts=True)
    if len(groups) < 2:
        raise PreftuneError(
            f"cannot hold out an eval split: all {len(ranks)} records share one prompt; use eval fraction 0")
    target = max(1, round(eval_fraction * len(ranks)))
    chosen = np.zeros(len(groups), dtype=bool)
    chosen[_groups(sizes.tolist(), target)] = True
    return chosen[group_of.reshape(-1)]


def _groups(sizes: Sequence[int], target: int) -> list[int]:
    """Which prompt groups (given in rank order, by size) go to eval: each in turn while it fits into `target`
    records; if none fits, the smallest (the first of equals); never all of them."""
    chosen: list[int] = []
    taken = 0
    for g, size in enumerate(sizes):
        if taken + size <= target:
            chosen.append(g)
            taken += size
        if taken >= target:
            break
    if not chosen:  # every group is larger than the target: take the smallest, ties broken by rank
        chosen = [min(range(len(sizes)), key=lambda g: sizes[g])]
    if len(chosen) == len(sizes):
        chosen = chosen[:-1]
    return chosen
