"""What every reader, layout and check shares about raw rows: an input, a row that could not be parsed, the bounds.

It sits below `preftune.data.readers` (one reader per file kind) and `preftune.data.sources` (which picks the
reader), so that neither imports the other back.

Bounds are enforced while reading, never after: a line longer than `MAX_LINE_BYTES` is not collected (its bytes
are skipped up to the next line break and it becomes one invalid row), a line longer than `MAX_SKIP_BYTES` ends
the file with one sentence (no data file has one; a gzip bomb does), and a file that must be parsed whole is
read only up to `MAX_WHOLE_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

# A row this long is almost always a concatenation accident (a missing newline between thousands of rows);
# refusing it early keeps one bad line from costing gigabytes of tokenizer memory.
MAX_ROW_CHARS = 1_000_000
MAX_LINE_BYTES = 4 * MAX_ROW_CHARS  # a character is at most 4 bytes of UTF-8
MAX_SKIP_BYTES = 256 << 20  # one line this long (decompressed) is no data file: stop reading, say so
MAX_WHOLE_BYTES = 256 << 20  # a file parsed whole (gzipped Parquet, one pretty-printed JSON object)
CHUNK_ROWS = 4096  # rows a streaming reader hands on at a time


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages ("object", "list", "string", "null", ...)."""
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)


@dataclass
class Input:
    name: str  # as shown in messages
    path: Path | None
    how: str  # "file" | "disk" | "hub"
    unit: str = "line"


@dataclass
class Bad:
    """A row that could not be parsed, with the reason (one invalid row, not a failed file)."""

    reason: str


Rows = list[tuple[int, Any]]


def nul_error(inp: Input) -> PreftuneError:
    return PreftuneError(
        f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file (it contains NUL bytes, so it is binary)"
    )


def too_long_row(size: int, unit: str = "") -> Bad:
    return Bad(f"row longer than {MAX_ROW_CHARS:,} characters ({size:,}{' ' + unit if unit else ''})")


def endless_line(inp: Input, line: int, limit: int = MAX_SKIP_BYTES) -> PreftuneError:
    return PreftuneError(
        f"{inp.name} line {line} runs over {limit >> 20} MB without a line break, which no data file does "
        "(a compressed bomb or a binary file?); check that it is the data you meant"
    )


def too_big(inp: Input, what: str) -> PreftuneError:
    return PreftuneError(
        f"{inp.name} is {what} over {MAX_WHOLE_BYTES >> 20} MB, which is read whole; write it as JSON Lines, "
        "which is read a chunk at a time"
    )
