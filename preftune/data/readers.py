"""One reader per file kind, each turning bytes into rows ``(row number, dict or Bad)``.

JSON Lines, Parquet files, ``save_to_disk`` folders and hub datasets are read in chunks of rows, so a file larger
than memory streams through validation and tokenization; a JSON array and a CSV file are parsed whole (the
standard library parses neither incrementally; both are rare at sizes where that matters). `preftune.data.sources`
sniffs a file and picks the reader; these functions raise nothing but `PreftuneError`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from preftune.data.sources import MAX_ROW_CHARS, Bad, Input, Rows, type_name
from preftune.errors import PreftuneError

BLOCK = 1 << 22  # bytes read at a time from a JSONL file
# A JSON escape of one half of a UTF-16 surrogate pair (\ud800-\udfff). json.loads turns a lone one into a str
# that no UTF-8 encoder (the tokenizer's included) accepts; a proper pair becomes one character.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def nul_error(inp: Input) -> PreftuneError:
    return PreftuneError(
        f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file (it contains NUL bytes, so it is binary)"
    )


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


def _row(obj: Any, check_surrogates: bool) -> Any:
    if not isinstance(obj, dict):
        return Bad(f"not an object (a JSON {type_name(obj)})")
    reason = lone_surrogate(obj) if check_surrogates else None
    return Bad(reason) if reason else obj


# ------------------------------------------------------------------------------------------------ JSON Lines

def _byte_lines(inp: Input, f: BinaryIO, head: bytes) -> Iterator[bytes]:
    """Lines (split on b"\\n" only) of `head` + the rest of `f`, a block at a time."""
    if b"\x00" in head:
        raise nul_error(inp)
    pending: list[bytes] = []
    block = head
    while block:
        if b"\n" not in block:  # one long line: collect its pieces, join once
            pending.append(block)
        else:
            lines = (b"".join(pending) + block).split(b"\n")
            pending = [lines.pop()]
            yield from lines
        block = f.read(BLOCK)
        if b"\x00" in block:
            raise nul_error(inp)
    yield b"".join(pending)


def json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg}: column {e.colno})"
    if isinstance(e, RecursionError):
        return "not valid JSON (nested too deeply)"
    return f"not valid JSON ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"


def _bad_json(rows: Rows) -> bool:
    return all(isinstance(obj, Bad) and obj.reason.startswith("not valid JSON") for _, obj in rows)


def jsonl_chunks(inp: Input, f: BinaryIO, head: bytes, chunk_rows: int, reread: Any) -> Iterator[Rows]:
    """Rows of a JSON Lines file in chunks; `head` is what was already read of `f` (without a UTF-8 BOM).

    A line that is not UTF-8 is one bad row; a file that is mostly not UTF-8 is refused at the end. Rows are
    held back while no line has parsed: a file where none does may be one pretty-printed JSON object
    (``{"data": [...]}``), read whole again with `reread()` (its bytes) at the end.
    """
    rows: Rows = []
    undecided = True  # every row so far is "not valid JSON"
    bad_utf8 = nonblank = 0
    loads = json.loads
    for number, raw in enumerate(_byte_lines(inp, f, head), start=1):
        stripped = raw.strip()
        nonblank += bool(stripped)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8 += 1
            rows.append((number, Bad("invalid UTF-8")))
        else:
            if not line.strip():
                continue
            if len(line) > MAX_ROW_CHARS:
                rows.append((number, Bad(f"row longer than {MAX_ROW_CHARS:,} characters ({len(line):,})")))
            else:
                try:
                    obj = loads(line)
                except (ValueError, RecursionError) as e:
                    rows.append((number, Bad(json_error(e))))
                else:
                    rows.append((number, _row(obj, "\\u" in line and bool(_SURROGATE_ESCAPE.search(line)))))
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
        text = "\n".join(x for x in _decoded_lines(reread()) if x is not None)
        rows = whole_json_object(inp, text) or rows
    if rows:
        yield rows


def _decoded_lines(data: bytes) -> list[str | None]:
    if data[:3] == b"\xef\xbb\xbf":
        data = data[3:]
    out: list[str | None] = []
    for raw in data.split(b"\n"):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out


def whole_json_object(inp: Input, text: str) -> Rows | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    lists = [v for v in obj.values() if isinstance(v, list)]
    if len(obj) == 1 and len(lists) == 1:  # {"data": [...]} as some exporters write it
        inp.unit = "element"
        return array_rows(lists[0], bool(_SURROGATE_ESCAPE.search(text)))
    return [(1, _row(obj, bool(_SURROGATE_ESCAPE.search(text))))]


# ------------------------------------------------------------------------------------------------ whole files

def read_json_array(inp: Input, data: bytes) -> Rows:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PreftuneError(f"{inp.name} is not valid UTF-8 (line {line}); save it as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PreftuneError(
            f"{inp.name} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file or write it "
            "as JSON Lines, one object per line, so that bad rows can be skipped"
        ) from None
    except (ValueError, RecursionError) as e:
        raise PreftuneError(f"{inp.name} is not valid JSON ({json_error(e)})") from None
    if not isinstance(obj, list):
        raise PreftuneError(f"{inp.name} is not valid JSON")
    if not obj:
        raise PreftuneError(f"data file {inp.name} is empty (an empty JSON array)")
    return array_rows(obj, bool(_SURROGATE_ESCAPE.search(text)))


def array_rows(items: list, check_surrogates: bool = False, start: int = 1) -> Rows:
    return [(number, _row(obj, check_surrogates)) for number, obj in enumerate(items, start=start)]


def read_csv(inp: Input, data: bytes, delimiter: str) -> Rows:
    # Decode with surrogateescape so one bad byte costs one row, not the file; such rows are flagged below.
    try:
        text = data.decode("utf-8")
        lossy = False
    except UnicodeDecodeError:
        lines = _decoded_lines(data)
        bad = sum(x is None for x in lines)
        nonblank = sum(1 for raw in data.split(b"\n") if raw.strip())
        if bad * 2 > nonblank:
            raise PreftuneError(
                f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file: {bad} of {nonblank} lines are "
                "not valid UTF-8 text (save it as UTF-8)"
            ) from None
        text = data.decode("utf-8", "surrogateescape")
        lossy = True
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: Rows = []
    header: list[str] | None = None
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                if lossy and any(_has_surrogates(c) for c in header):
                    raise PreftuneError(f"the header of {inp.name} is not valid UTF-8; save the file as UTF-8")
                continue
            if lossy and any(_has_surrogates(c) for c in cells):
                rows.append((line, Bad("invalid UTF-8")))
                continue
            size = sum(len(c) for c in cells)
            if size > MAX_ROW_CHARS:
                rows.append((line, Bad(f"row longer than {MAX_ROW_CHARS:,} characters ({size:,})")))
                continue
            if len(cells) != len(header):
                rows.append((line, Bad(f"has {len(cells)} fields, the header has {len(header)}")))
                continue
            row = {h: _csv_cell(c) for h, c in zip(header, cells)}
            rows.append((line, _row(row, any(_SURROGATE_ESCAPE.search(c) for c in cells))))
    except csv.Error as e:
        raise PreftuneError(f"{inp.name} is not a readable CSV file (line {reader.line_num}: {e})") from None
    if header is None:
        raise PreftuneError(f"data file {inp.name} is empty")
    if not rows:
        raise PreftuneError(f"data file {inp.name} has a header but no data rows")
    return rows


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
    import pyarrow.parquet as pq

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


def load_saved_dataset(inp: Input, split: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(inp.path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors for a broken folder
        raise PreftuneError(f"cannot load the saved dataset in {inp.name} ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PreftuneError(f"the saved dataset {inp.name} has no split {split!r}; it has {', '.join(ds.keys())}")
        ds = ds[split]
        inp.name = f"{inp.name}[{split}]"
    return ds


def load_hub_dataset(inp: Input, split: str) -> Any:
    try:
        import datasets

        return datasets.load_dataset(inp.name, split=split)
    except Exception as e:  # network, auth and "no such dataset" errors all mean the same to the user here
        raise PreftuneError(
            f"data path {inp.name} does not exist, and the hub dataset {inp.name} (split {split!r}) could not be "
            f"loaded ({first_line(e)}); check the path, or the dataset name and your network"
        ) from None


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else type(e).__name__) or type(e).__name__
