"""metrics.jsonl: one JSON object a line, each with `step` and `split`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, path: Path):
        self.path = path

    def write(self, step: int, split: str, values: dict[str, float]) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step, "split": split}
        # Full precision (json writes the shortest repr that reads back to the same float): rounding hid a
        # learning rate of 1e-6 as 0.0 and made runs compare equal or not by where the 6th decimal fell.
        # Non-finite values become null so every line stays strict JSON.
        row.update({k: ((v if math.isfinite(v) else None) if isinstance(v, float) else v)
                    for k, v in values.items()})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step`: a resumed run rewrites them, so none is duplicated."""
        if not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
