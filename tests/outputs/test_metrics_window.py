"""A metrics window's clock: throughput (pairs_per_s) counts training time only, so the time of an evaluation
or a checkpoint inside the window is taken out (Window.paused)."""

from __future__ import annotations

from preftune.outputs import metrics
from preftune.outputs.metrics import Window


def test_paused_time_is_not_the_windows(monkeypatch):
    """By hand: the window opens at t = 100 s, trains until 103, evaluates from 103 to 110, trains until 112:
    5 s of training, not 12."""
    now = iter([100.0, 103.0, 110.0, 112.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(now))
    window = Window()
    with window.paused():
        pass
    assert window.seconds() == 5.0


def test_an_error_inside_still_resumes_the_clock(monkeypatch):
    now = iter([0.0, 1.0, 4.0, 6.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(now))
    window = Window()
    try:
        with window.paused():
            raise KeyError("x")
    except KeyError:
        pass
    assert window.seconds() == 3.0
