"""Metrics: a window of additive sums between log lines, and metrics.jsonl (one JSON object a line, each
with `step` and `split`)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from preftune.outputs.files import append_text, replace_text


class Window:
    """Additive sums over the micro-batches since the last log line (loss sums, reward sums, pair and token
    counts); an objective turns them into the logged means. Values may be tensors on the device: they are
    only read back once per log line, so a GPU is not synchronised at every micro-batch for the metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        # Per optimizer step and the same on every process, so kept apart from the sums reduced over processes.
        self.steps = 0
        self.grad_norm = 0.0
        self.lr = 0.0

    def add(self, sums: dict[str, Any]) -> None:
        for k, v in sums.items():
            if isinstance(v, torch.Tensor):  # float64 so long windows of fp32 sums lose nothing
                v = v.detach().to(torch.float64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def totals(self, engine=None) -> dict[str, float]:
        """The sums as floats, summed over all processes (the run's distributed.Engine), so logged figures cover
        the whole global batch."""
        keys = sorted(self.sums)
        device = engine.device if engine is not None else "cpu"
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=device).detach().reshape(())
                              for k in keys]) if keys else torch.zeros(0, dtype=torch.float64)
        if engine is not None:
            values = engine.sum_over_processes(values)
        return dict(zip(keys, values.tolist()))

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A block whose time does not count as the window's (an evaluation, a checkpoint)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - start


def zeroed(sums: dict[str, Any]) -> dict[str, Any]:
    """A filler batch's metric sums, all 0: every process must hold the same keys when a window is summed over
    processes (a process with only fillers in a window would otherwise send an empty vector)."""
    return {k: v * 0 for k, v in sums.items()}


class MetricsWriter:
    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def row(step: int, split: str, values: dict[str, Any]) -> dict[str, Any]:
        """The line as written: `step`, `split`, then the values at full precision (json writes the shortest
        repr that reads back to the same float; rounding once logged a learning rate of 1e-6 as 0.0).
        Non-finite values become null so every line stays strict JSON."""
        row: dict[str, Any] = {"step": step, "split": split}
        row.update({k: ((v if math.isfinite(v) else None) if isinstance(v, float) else v)
                    for k, v in values.items()})
        return row

    def write(self, row: dict[str, Any]) -> None:
        append_text(self.path, json.dumps(row) + "\n")  # never through a link; a failed append is cut back

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step`: a resumed run rewrites them, so none is duplicated. A line cut short
        (a crash or a full disk in the middle of a write) is dropped too."""
        if not self.path.is_file():
            return
        keep = []
        for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(ln)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(ln)
        replace_text(self.path, "".join(ln + "\n" for ln in keep))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


MAX_LINE = 1 << 20  # a metrics line is a few hundred bytes: a longer one is not a metrics row


def _lines(path: Path) -> Iterator[str]:
    """The file's lines as text (bytes that are not UTF-8 replaced), an overlong one as a junk line: memory stays
    bounded whatever the file holds."""
    with path.open("rb") as f:
        while line := f.readline(MAX_LINE):
            if not line.endswith(b"\n") and len(line) == MAX_LINE:  # skip the rest of an overlong line
                while (more := f.readline(MAX_LINE)) and not more.endswith(b"\n"):
                    pass
                line = b"{overlong\n"
            yield line.decode("utf-8", errors="replace")


def is_row(row: Any) -> bool:
    """A metrics row: an object with a finite number `step` and a text `split`."""
    step = row.get("step") if isinstance(row, dict) else None
    return isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) and \
        isinstance(row.get("split"), str)


def metric_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """A metrics.jsonl written by anyone, read for a report: (its rows, how many whole lines were not rows). A
    last line still being written (no newline yet, or cut JSON) is skipped without counting."""
    rows, bad = [], 0
    for ln in _lines(path):
        if ln.strip():
            try:
                row = json.loads(ln)
            except (ValueError, RecursionError):  # the writer is mid-line (the next report will have it), or junk
                row = None
            if is_row(row):
                rows.append(row)
            elif ln.endswith("\n"):
                bad += 1
    return rows, bad
