"""Prompts for `preftune generate --data FILE`: the prompt field of a data file, or a .txt file with one prompt a
line, read through the same bounded readers as training data (`preftune.data.sources`), so a field path
(``--prompt-field input.messages``) works as it does for `train`, and one endless line is one sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.data.fields import MISSING, get_path
from preftune.data.readers import LongLine, byte_lines
from preftune.data.rows import MAX_ROW_CHARS, Bad, Input
from preftune.data.sources import iter_rows, resolve
from preftune.errors import PreftuneError


def read_prompts(source: str | Path, prompt_field: str = "prompt") -> list[str | list[dict]]:
    """Prompts from a file: JSONL, JSON, CSV or Parquet rows with a `prompt_field` (a path like ``input.messages``;
    a string or a message list: preference and SFT data files qualify), or a .txt file with one prompt a line."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise PreftuneError(f"prompt file {path} does not exist; pass a .jsonl, .json or .txt file.")
    prompts = _text_lines(path) if path.suffix.lower() == ".txt" else _field_values(path, prompt_field)
    if not prompts:
        raise PreftuneError(f"prompt file {path} holds no prompts.")
    return prompts


def _text_lines(path: Path) -> list[Any]:
    out: list[Any] = []
    inp = Input(str(path), path, "file")
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(byte_lines(inp, f, f.read(1 << 16)), start=1):
                text = None if isinstance(raw, LongLine) else raw.rstrip(b"\r").decode("utf-8", "replace")
                if text is None or len(text) > MAX_ROW_CHARS:
                    raise PreftuneError(f"prompt file {path} line {number} is longer than {MAX_ROW_CHARS:,} "
                                        "characters; split it or shorten it")
                if text.strip():
                    out.append(text)
    except OSError as e:
        raise PreftuneError(f"cannot read prompt file {path} ({e.strerror or e}).") from None
    return out


def _field_values(path: Path, prompt_field: str) -> list[Any]:
    out: list[Any] = []
    for chunk in iter_rows(resolve(str(path))[0], None):
        for number, row in chunk:
            if isinstance(row, Bad):
                raise PreftuneError(f"row {number} of {path} is not readable ({row.reason}).")
            value = get_path(row, prompt_field)
            if value is MISSING or not isinstance(value, (str, list)):
                raise PreftuneError(f"row {number} of {path} has no {prompt_field!r} text; pass --prompt-field NAME "
                                    "for another column (a path such as input.messages for a nested one).")
            out.append(value)
    return out
