"""Process-level controls of a run: seeding, and stopping cleanly on SIGTERM/SIGINT.

A scheduler's SIGTERM (or a Ctrl-C) never loses trained weights: during setup, when nothing is trained yet, it
stops the run at once (`Stopped`); from the first step on it only sets a flag, and the recipe keeps the weights
at the next boundary (a checkpoint, or the whole final/ when it is being written) and exits with the
"resumable" status, so a requeued job continues where it stopped.
"""

from __future__ import annotations

import random
import signal
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Stopped(KeyboardInterrupt):
    """A signal stopped the run during setup (before the first step): nothing trained, nothing to keep. A
    KeyboardInterrupt, so that every `except Exception` lets it through and every clean-up still runs."""

    def __init__(self, signum: int, phase: str):
        self.signum, self.phase = signum, phase
        super().__init__(f"stopped by {signal.Signals(signum).name} during {phase}, before the first step; nothing "
                         "was trained, so nothing is lost: run the same command again")


class StopRequest:
    """SIGTERM/SIGINT: raise `Stopped` while `phase` is set (setup: nothing to keep), else set a flag that the loop
    reads at the next step boundary. A second Ctrl-C means now."""

    def __init__(self, phase: str | None = None) -> None:
        self.signal: int | None = None
        self.phase = phase
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        if self.phase is not None:
            raise Stopped(signum, self.phase)
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
