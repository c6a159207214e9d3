"""BCO's running reward shift δ: the only state a loss keeps between steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RewardShift:
    """Running mean δ of all BCO rewards (r_c and r_r) seen so far.

    Kept as an exact float64 sum and an integer count, so `value` equals the plain mean over
    every reward ever added (up to float64 summation order) and a run resumed from `state_dict()`
    continues bit-for-bit. After each optimiser step, `add` the step's rewards' sum and count, summed
    over all processes, so every process holds the same δ. Before the first step δ = 0.
    """

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0

    @property
    def value(self) -> float:
        return self._sum / self._count if self._count else 0.0

    def add(self, total: float, count: int) -> None:
        """Fold a sum of `count` rewards into the running mean (a step's rewards summed over processes)."""
        self._sum += total
        self._count += count

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._sum = float(state["sum"])
        self._count = int(state["count"])

    def __repr__(self) -> str:
        return f"RewardShift(value={self.value:.6g}, count={self._count})"
