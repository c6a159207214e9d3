"""One reader per file kind, each turning bytes into rows ``(row number, dict or Bad)``, a chunk at a time.

JSON Lines, CSV, JSON arrays, Parquet files, ``save_to_disk`` folders and hub datasets are all read in chunks of
rows, so a file larger than memory streams through validation and tokenization; lines and array elements are
bounded while they are read (`preftune.data.rows`), so one endless line costs a few MB, not the machine.
`preftune.data.sources` sniffs a file and picks the reader; these functions raise nothing but `PreftuneError`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from preftune.data.rows import (
    MAX_LINE_BYTES,
    MAX_ROW_CHARS,
    MAX_SKIP_BYTES,
    Bad,
    Input,
    Rows,
    endless_line,
    nul_error,
    too_long_row,
    type_name,
)
from preftune.errors import PreftuneError

BLOCK = 1 << 22  # bytes read at a time
# A JSON escape of one half of a UTF-16 surrogate pair (\ud800-\udfff). json.loads turns a lone one into a str
# that no UTF-8 encoder (the tokenizer's included) accepts; a proper pair becomes one character.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Why a parsed row cannot be text: the first string holding a lone UTF-16 surrogate (from an escape such as
    ``"\\ud800"`` without its other half), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"field '{path}'" if path else "a value"
            return (f"{where} holds a lone UTF-16 surrogate ({ascii(value[e.start])[1:-1]} without its pair), "
                    "which is not text; fix the escape in the file")
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        reason = lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if reason:
            return reason
    return None


def row(obj: Any, check_surrogates: bool) -> Any:
    if not isinstance(obj, dict):
        return Bad(f"not an object (a JSON {type_name(obj)})")
    reason = lone_surrogate(obj) if check_surrogates else None
    return Bad(reason) if reason else obj


def array_rows(items: list, check_surrogates: bool = False, start: int = 1) -> Rows:
    return [(number, row(obj, check_surrogates)) for number, obj in enumerate(items, start=start)]


# ------------------------------------------------------------------------------------------------ lines

class LongLine:
    """A line longer than MAX_LINE_BYTES: its bytes were skipped, only its length is known."""

    def __init__(self, size: int):
        self.size = size


def byte_lines(inp: Input, f: BinaryIO, head: bytes) -> Iterator[bytes | LongLine]:
    """Lines (split on b"\\n" only) of `head` + the rest of `f`, a block at a time; a line over MAX_LINE_BYTES is
    skipped as it is read (a `LongLine`), one over MAX_SKIP_BYTES ends the file with one sentence."""
    pending: list[bytes] = []
    size, skipping, number = 0, False, 0
    block = head
    while block:
        if b"\x00" in block:
            raise nul_error(inp)
        parts = block.split(b"\n")
        if len(parts) > 1:
            first = parts[0]
            size += len(first)
            line = LongLine(size) if skipping or size > MAX_LINE_BYTES else b"".join(pending) + first
            yield from [line] + [p if len(p) <= MAX_LINE_BYTES else LongLine(len(p)) for p in parts[1:-1]]
            number += len(parts) - 1
            pending, size, skipping = [], 0, False
        size += len(parts[-1])
        if not skipping:
            pending.append(parts[-1])
            if size > MAX_LINE_BYTES:
                pending, skipping = [], True
        if size > MAX_SKIP_BYTES:
            raise endless_line(inp, number + 1, MAX_SKIP_BYTES)
        block = f.read(BLOCK)
    yield LongLine(size) if skipping else b"".join(pending)


# ------------------------------------------------------------------------------------------------ JSON Lines

def json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg}: column {e.colno})"
    if isinstance(e, RecursionError):
        return "not valid JSON (nested too deeply)"
    return f"not valid JSON ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"


def _bad_json(rows: Rows) -> bool:
    return all(isinstance(obj, Bad) and obj.reason.startswith("not valid JSON") for _, obj in rows)


def _json_line(raw: bytes | LongLine) -> Any:
    """One JSONL line: a row (dict or Bad), None for a blank line, or "utf8" for a line that is not UTF-8."""
    if isinstance(raw, LongLine):
        return too_long_row(raw.size, "bytes")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "utf8"
    if not line.strip():
        return None
    if len(line) > MAX_ROW_CHARS:
        return too_long_row(len(line))
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        return Bad(json_error(e))
    return row(obj, "\\u" in line and bool(SURROGATE_ESCAPE.search(line)))


def jsonl_chunks(inp: Input, f: BinaryIO, head: bytes, chunk_rows: int, reread: Callable[[], bytes]) -> Iterator[Rows]:
    """Rows of a JSON Lines file in chunks; `head` is what was already read of `f` (without a UTF-8 BOM).

    A line that is not UTF-8 is one bad row; a file that is mostly not UTF-8 is refused at the end. Rows are
    held back while no line has parsed: a file where none does may be one pretty-printed JSON object
    (``{"data": [...]}``), read whole again with `reread()` (its bytes) at the end.
    """
    rows: Rows = []
    undecided = True  # every row so far is "not valid JSON"
    bad_utf8 = nonblank = 0
    for number, raw in enumerate(byte_lines(inp, f, head), start=1):
        out = _json_line(raw)
        nonblank += out is not None
        if out is None:
            continue
        if out == "utf8":
            bad_utf8 += 1
            out = Bad("invalid UTF-8")
        rows.append((number, out))
        if undecided and not _bad_json(rows[-1:]):
            undecided = False
        if not undecided and len(rows) >= chunk_rows:
            yield rows
            rows = []
    if bad_utf8 and bad_utf8 * 2 > nonblank:
        raise PreftuneError(
            f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file: {bad_utf8} of {nonblank} lines are "
            "not valid UTF-8 text (save it as UTF-8)"
        )
    if rows and undecided:
        rows = whole_json_object(inp, reread()) or rows
    if rows:
        yield rows


def whole_json_object(inp: Input, data: bytes) -> Rows | None:
    """The rows of a file that is one JSON object: ``{"data": [...]}`` as some exporters write it, else the object."""
    text = data.decode("utf-8", "replace").removeprefix("\ufeff")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    lists = [v for v in obj.values() if isinstance(v, list)]
    if len(obj) == 1 and len(lists) == 1:
        inp.unit = "element"
        return array_rows(lists[0], bool(SURROGATE_ESCAPE.search(text)))
    return [(1, row(obj, bool(SURROGATE_ESCAPE.search(text))))]


# ------------------------------------------------------------------------------------------------ CSV

def csv_chunks(inp: Input, f: BinaryIO, head: bytes, delimiter: str, chunk_rows: int) -> Iterator[Rows]:
    """Rows of a CSV/TSV file with a header row, streamed line by line through the standard `csv` module.

    One bad byte costs one row, not the file (lines are decoded with surrogateescape and such rows flagged); a
    file that is mostly not UTF-8 is refused at the end. A physical line over MAX_LINE_BYTES ends the file with
    one sentence (a CSV row cannot be resynchronised past it: it may sit inside a quoted cell).
    """
    count = {"bad": 0, "nonblank": 0, "line": 0}

    def text_lines() -> Iterator[str]:
        for raw in byte_lines(inp, f, head):
            count["line"] += 1
            if isinstance(raw, LongLine):
                raise PreftuneError(f"{inp.name} line {count['line']} is longer than {MAX_LINE_BYTES:,} bytes; fix "
                                    "the file or write it as JSON Lines")
            count["nonblank"] += bool(raw.strip())
            try:
                yield raw.decode("utf-8") + "\n"
            except UnicodeDecodeError:
                count["bad"] += 1
                yield raw.decode("utf-8", "surrogateescape") + "\n"

    csv.field_size_limit(MAX_LINE_BYTES)  # a quoted cell running over many lines is bounded too
    reader = csv.reader(text_lines(), delimiter=delimiter)
    rows: Rows = []
    header: list[str] | None = None
    start, data_rows = 1, 0
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            lossy = count["bad"] > 0 and any(_has_surrogates(c) for c in cells)
            if header is None:
                if lossy:
                    raise PreftuneError(f"the header of {inp.name} is not valid UTF-8; save the file as UTF-8")
                header = [c.strip() for c in cells]
                continue
            rows.append((line, _csv_row(header, cells, lossy)))
            data_rows += 1
            if len(rows) >= chunk_rows:
                yield rows
                rows = []
    except csv.Error as e:
        raise PreftuneError(f"{inp.name} is not a readable CSV file (line {reader.line_num}: {e})") from None
    if count["bad"] * 2 > count["nonblank"]:
        raise PreftuneError(
            f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file: {count['bad']} of "
            f"{count['nonblank']} lines are not valid UTF-8 text (save it as UTF-8)")
    if header is None:
        raise PreftuneError(f"data file {inp.name} is empty")
    if not data_rows:
        raise PreftuneError(f"data file {inp.name} has a header but no data rows")
    if rows:
        yield rows


def _csv_row(header: list[str], cells: list[str], lossy: bool) -> Any:
    if lossy:
        return Bad("invalid UTF-8")
    size = sum(len(c) for c in cells)
    if size > MAX_ROW_CHARS:
        return too_long_row(size)
    if len(cells) != len(header):
        return Bad(f"has {len(cells)} fields, the header has {len(header)}")
    obj = {h: _csv_cell(c) for h, c in zip(header, cells)}
    return row(obj, any(SURROGATE_ESCAPE.search(c) for c in cells))


def _csv_cell(cell: str) -> Any:
    # Conversational data in CSV can only be JSON text in a cell; decode it only when it is a list of
    # objects, so that a prompt that merely starts with "[" stays the string it is.
    if cell[:1] == "[" and cell.rstrip()[-1:] == "]":
        try:
            value = json.loads(cell)
        except (ValueError, RecursionError):
            return cell
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            return value
    return cell


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ------------------------------------------------------------------------------------------------ Arrow-backed

def parquet_chunks(inp: Input, source: Any, chunk_rows: int) -> Iterator[Rows]:
    """Rows of a Parquet file (a path, or a pyarrow buffer for a gzipped one) a row group slice at a time."""
    import pyarrow.parquet as pq  # pyarrow loads in ~0.3 s: only for Parquet files

    def fail(e: Exception) -> PreftuneError:
        return PreftuneError(
            f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file (Parquet reader: {first_line(e)})"
        )

    try:
        pf = pq.ParquetFile(source)
        batches = pf.iter_batches(batch_size=chunk_rows)
    except Exception as e:  # pyarrow raises many types (ArrowInvalid, OSError, ...) for a corrupt file
        raise fail(e) from None
    number = 1
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:
            raise fail(e) from None
        if batch is None:
            break
        items = batch.to_pylist()
        if items:
            yield array_rows(items, start=number)
            number += len(items)
    if number == 1:
        raise PreftuneError(f"data file {inp.name} is empty (a Parquet file with no rows)")


def dataset_chunks(inp: Input, ds: Any, chunk_rows: int, empty: str) -> Iterator[Rows]:
    """Rows of a `datasets.Dataset` (memory-mapped Arrow), `chunk_rows` at a time."""
    if len(ds) == 0:
        raise PreftuneError(empty)
    number = 1
    for batch in ds.iter(batch_size=chunk_rows):
        keys = list(batch)
        items = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
        yield array_rows(items, start=number)
        number += len(items)


def pick_split(what: str, names: list[str], split: str | None) -> str:
    """The split to read of a data set with splits `names`: the one asked for, else "train", else the only one."""
    listing = ", ".join(names)
    if split is not None:
        if split not in names:
            raise PreftuneError(f"{what} has no split {split!r}; its splits are {listing}: pass one with --split "
                                "(and --eval-split for the held-out one)")
        return split
    if "train" in names or len(names) == 1:
        return "train" if "train" in names else names[0]
    raise PreftuneError(f"{what} has the splits {listing} and none is called 'train'; pick the training split "
                        f"with --split NAME (and the held-out one with --eval-split NAME)")


def load_saved_dataset(inp: Input, split: str | None) -> Any:
    import datasets  # ~1 s to import: only for saved-dataset folders

    try:
        ds = datasets.load_from_disk(str(inp.path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors for a broken folder
        raise PreftuneError(f"cannot load the saved dataset in {inp.name} ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = pick_split(f"the saved dataset {inp.name}", list(ds.keys()), split)
        ds = ds[name]
        inp.name = f"{inp.name}[{name}]"
    elif split is not None:
        raise PreftuneError(f"the saved dataset {inp.name} is one split, not a DatasetDict; leave out --split "
                            f"{split} (or --eval-split)")
    return ds


def load_hub_dataset(inp: Input, split: str | None) -> Any:
    try:
        import datasets  # ~1 s to import: only for hub datasets

        return datasets.load_dataset(inp.name, split=split or "train")
    except Exception as e:  # network, auth and "no such dataset" errors all mean the same to the user here
        raise PreftuneError(
            f"data path {inp.name} does not exist, and the hub dataset {inp.name} (split {split or 'train'!r}) could "
            f"not be loaded ({first_line(e)}); check the path, or the dataset name, the split and your network"
        ) from None


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else type(e).__name__) or type(e).__name__
