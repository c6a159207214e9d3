"""Reading data sources into raw rows: files, folders, globs, ``save_to_disk`` folders and hub datasets.

Supported inputs (``source``):

* ``.jsonl`` / ``.json`` files: JSON Lines or one JSON array, told apart by the first non-space character;
  gzip-compressed files are read transparently;
* ``.csv`` / ``.tsv`` files with a header row (cells that hold a JSON list of messages are decoded);
* ``.parquet`` files;
* a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder: ``split`` picks one);
* a folder of data files, a glob (``data/*.jsonl``) or a list of any of these;
* a hub dataset ``owner/name``, only when the string is not an existing path.

`iter_rows` yields chunks of ``[(row number, dict or Bad)]`` (`read_rows` all of them): a row that cannot be
parsed is a `Bad` carrying its reason, so that one broken line costs one row, not the file. Whole-file problems
raise `PreftuneError`. The readers themselves (JSONL and Parquet streamed) are in `preftune.data.readers`.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from preftune.data.json_arrays import json_array_chunks
from preftune.data.readers import (
    BLOCK,
    csv_chunks,
    dataset_chunks,
    jsonl_chunks,
    load_hub_dataset,
    load_saved_dataset,
    parquet_chunks,
)
from preftune.data.rows import CHUNK_ROWS, MAX_WHOLE_BYTES, Bad, Input, Rows, nul_error, too_big
from preftune.errors import PreftuneError

__all__ = ["Bad", "Input", "Rows", "iter_rows", "read_rows", "resolve"]

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz", ".txt", ".ndjson")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def resolve(source: str | Path | Sequence[str | Path]) -> list[Input]:
    if isinstance(source, (str, Path)):
        items = [source]
    elif isinstance(source, Sequence):
        items = list(source)
        if not items:
            raise PreftuneError("no data files given; pass a file, a folder, a glob or a hub dataset name")
    else:
        raise PreftuneError(f"data source must be a path or a list of paths, not {type(source).__name__}")
    out: list[Input] = []
    seen: set[str] = set()
    for item in items:
        for inp in _resolve_one(item):
            if inp.name not in seen:
                seen.add(inp.name)
                out.append(inp)
    return out


def _resolve_one(item: str | Path) -> list[Input]:
    if not isinstance(item, (str, Path)):
        raise PreftuneError(f"data source must be a path, not {type(item).__name__}")
    text = str(item)
    if not text.strip():
        raise PreftuneError("the data path is empty; pass a file, a folder, a glob or a hub dataset name")
    path = Path(text).expanduser()
    if path.is_file():
        return [Input(text, path, "file")]
    if path.is_dir():
        if _is_saved_dataset(path):
            return [Input(text, path, "disk", "row")]
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_data_name(p))
        if not files:
            raise PreftuneError(
                f"data folder {text} holds no .jsonl/.json/.csv/.parquet files and is not a saved dataset"
            )
        return [Input(str(p), p, "file") for p in files]
    if _GLOB_CHARS.search(text):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise PreftuneError(f"no data files match {text}")
        return [Input(str(p), p, "file") for p in files]
    if _HUB_NAME.match(text) and not text.lower().endswith(DATA_SUFFIXES):
        return [Input(text, None, "hub", "row")]
    raise PreftuneError(f"data file {text} does not exist")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _is_data_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(DATA_SUFFIXES) and not name.startswith(".")


# ----------------------------------------------------------------------------------------------------------
# reading rows: each reader returns [(row number, dict-or-Bad)], never raises anything but PreftuneError


def read_rows(inp: Input, split: str | None = None) -> Rows:
    """All rows of one input (see `iter_rows`)."""
    return [row for chunk in iter_rows(inp, split) for row in chunk]


def iter_rows(inp: Input, split: str | None, chunk_rows: int = CHUNK_ROWS) -> Iterator[Rows]:
    """The rows of one input in chunks, in order, never the whole file at once (`preftune.data.readers`).
    `split` picks a split of a saved DatasetDict or a hub dataset (None: "train", or the only one); a file is
    all one split ("train"). Whole-file problems raise `PreftuneError` (a few, such as NUL bytes deep in a file, only when the
    reading gets there)."""
    if inp.how == "disk":
        ds = load_saved_dataset(inp, split)
        yield from dataset_chunks(inp, ds, chunk_rows, f"the saved dataset {inp.name} is empty")
        return
    if inp.how == "hub":
        ds = load_hub_dataset(inp, split)
        yield from dataset_chunks(inp, ds, chunk_rows,
                                          f"the hub dataset {inp.name} (split {split or 'train'!r}) is empty")
        return
    assert inp.path is not None
    if split not in (None, "train"):  # "train", the default name, is what a file holds
        raise PreftuneError(f"--split {split} names a split of a saved dataset folder or a hub dataset; {inp.name} "
                            "is a file: leave --split (and --eval-split) out, or pass the eval file as --eval-data")
    with _open(inp) as f:
        head = _head(f)
        suffix = _suffix(inp.path)
        if head[:4] == b"PAR1" or suffix == ".parquet":
            inp.unit = "row"
            if isinstance(f, _Gunzip):  # pyarrow needs to seek: decompress the whole file
                import pyarrow as pa  # only for a gzipped Parquet file

                yield from parquet_chunks(inp, pa.BufferReader(_read_capped(inp, f, head)), chunk_rows)
            else:
                yield from parquet_chunks(inp, str(inp.path), chunk_rows)
            return
        if not head.strip():
            raise PreftuneError(f"data file {inp.name} is empty")
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise PreftuneError(f"{inp.name} is UTF-16 encoded; save it as UTF-8")
        if b"\x00" in head:
            raise nul_error(inp)
        head = head[3:] if head[:3] == b"\xef\xbb\xbf" else head
        first = head.lstrip()[:1]
        if suffix in (".csv", ".tsv"):
            yield from csv_chunks(inp, f, head, "\t" if suffix == ".tsv" else ",", chunk_rows)
        elif first == b"[":
            inp.unit = "element"
            yield from json_array_chunks(inp, f, head, chunk_rows)
        elif first == b"{" or suffix in (".jsonl", ".ndjson"):
            yield from jsonl_chunks(inp, f, head, chunk_rows, lambda: _read_all(inp))
        else:
            raise PreftuneError(
                f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file (it starts with "
                f"{head.lstrip()[:20]!r}); use .jsonl, .json, .csv or .parquet"
            )


class _Gunzip:
    """A gzip stream whose decompression errors become one clear `PreftuneError`."""

    def __init__(self, inp: Input, raw: BinaryIO):
        self.inp, self.raw, self.gz = inp, raw, gzip.GzipFile(fileobj=raw)

    def read(self, n: int = -1) -> bytes:
        try:
            return self.gz.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise PreftuneError(f"{self.inp.name} looks gzip-compressed but cannot be decompressed ({e})") from None

    def close(self) -> None:
        self.gz.close()
        self.raw.close()

    def __enter__(self) -> _Gunzip:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _open(inp: Input) -> Any:
    assert inp.path is not None
    try:
        raw = inp.path.open("rb")
        magic = raw.read(2)
        raw.seek(0)
    except OSError as e:
        raise PreftuneError(f"cannot read data file {inp.name}: {e.strerror or e}") from None
    return _Gunzip(inp, raw) if magic == b"\x1f\x8b" else raw


def _head(f: Any) -> bytes:
    """The first block of the (decompressed) file, extended until it holds a non-space byte or the file ends."""
    head = f.read(1 << 16)
    while head and not head[3 if head[:3] == b"\xef\xbb\xbf" else 0:].strip():
        more = f.read(1 << 16)
        if not more:
            break
        head += more
    return head


def _read_capped(inp: Input, f: Any, head: bytes) -> bytes:
    """`head` + the rest of `f`, refused once it passes MAX_WHOLE_BYTES (decompressed), while reading."""
    parts, size = [head], len(head)
    while block := f.read(BLOCK):
        size += len(block)
        if size > MAX_WHOLE_BYTES:
            raise too_big(inp, "one JSON value or gzipped Parquet file")
        parts.append(block)
    return b"".join(parts)


def _read_all(inp: Input) -> bytes:
    with _open(inp) as f:
        return _read_capped(inp, f, b"")


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""
