"""Small data files for the data tests: JSONL with literal broken lines, CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

PAIRS = [
    {"prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
]


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows one per line; raw_lines maps a 1-based line number to a literal line inserted there."""
    lines = [json.dumps(r) for r in rows]
    for number, text in sorted((raw_lines or {}).items()):
        lines.insert(number - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
