"""Reading data sources into raw rows: files, folders, globs, ``save_to_disk`` folders and hub datasets.

Supported inputs (``source``):

* ``.jsonl`` / ``.json`` files: JSON Lines or one JSON array, told apart by the first non-space character;
  gzip-compressed files are read transparently;
* ``.csv`` / ``.tsv`` files with a header row (cells that hold a JSON list of messages are decoded);
* ``.parquet`` files;
* a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder: ``split`` picks one);
* a folder of data files, a glob (``data/*.jsonl``) or a list of any of these;
* a hub dataset ``owner/name``, only when the string is not an existing path.

`read_rows` returns ``[(row number, dict or Bad)]``: a row that cannot be parsed is a `Bad` carrying its
reason, so that one broken line costs one row, not the file. Whole-file problems raise `PreftuneError`.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

# A row this long is almost always a concatenation accident (a missing newline between thousands of rows);
# refusing it early keeps one bad line from costing gigabytes of tokenizer memory.
MAX_ROW_CHARS = 1_000_000
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz", ".txt", ".ndjson")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")


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


@dataclass
class Bad:
    reason: str


Rows = list[tuple[int, Any]]


def read_rows(inp: Input, split: str) -> Rows:
    if inp.how == "disk":
        return _read_saved_dataset(inp, split)
    if inp.how == "hub":
        return _read_hub(inp, split)
    assert inp.path is not None
    try:
        data = inp.path.read_bytes()
    except OSError as e:
        raise PreftuneError(f"cannot read data file {inp.name}: {e.strerror or e}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise PreftuneError(
                f"{inp.name} looks gzip-compressed but cannot be decompressed ({e})"
            ) from None
    suffix = _suffix(inp.path)
    if data[:4] == b"PAR1" or suffix == ".parquet":
        inp.unit = "row"
        return _read_parquet(inp, data)
    if not data.strip():
        raise PreftuneError(f"data file {inp.name} is empty")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise PreftuneError(f"{inp.name} is UTF-16 encoded; save it as UTF-8")
    if b"\x00" in data:
        raise PreftuneError(
            f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file "
            "(it contains NUL bytes, so it is binary)"
        )
    if data[:3] == b"\xef\xbb\xbf":
        data = data[3:]
    if suffix in (".csv", ".tsv"):
        return _read_csv(inp, data, "\t" if suffix == ".tsv" else ",")
    first = data.lstrip()[:1]
    if first == b"[":
        inp.unit = "element"
        return _read_json_array(inp, data)
    if first == b"{" or suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(inp, data)
    raise PreftuneError(
        f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file "
        f"(it starts with {data.lstrip()[:20]!r}); "
        "use .jsonl, .json, .csv or .parquet"
    )


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _lines(inp: Input, data: bytes) -> list[str | None]:
    """Decode to lines; a line that is not UTF-8 becomes None (reported per row, not for the whole file)."""
    try:
        # split on "\n" only: str.splitlines also splits on U+2028 etc., which are legal inside JSON strings
        return data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        pass
    lines: list[str | None] = []
    bad = 0
    for raw in data.split(b"\n"):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(None)
            bad += 1
    nonblank = sum(1 for raw in data.split(b"\n") if raw.strip())
    if bad * 2 > nonblank:
        raise PreftuneError(
            f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file: "
            f"{bad} of {nonblank} lines are not "
            "valid UTF-8 text (save it as UTF-8)"
        )
    return lines


def _json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg}: column {e.colno})"
    if isinstance(e, RecursionError):
        return "not valid JSON (nested too deeply)"
    return f"not valid JSON ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"


def _read_jsonl(inp: Input, data: bytes) -> Rows:
    rows: Rows = []
    loads = json.loads
    for number, line in enumerate(_lines(inp, data), start=1):
        if line is None:
            rows.append((number, Bad("invalid UTF-8")))
            continue
        if not line.strip():
            continue
        if len(line) > MAX_ROW_CHARS:
            rows.append((number, Bad(f"row longer than {MAX_ROW_CHARS:,} characters ({len(line):,})")))
            continue
        try:
            obj = loads(line)
        except (ValueError, RecursionError) as e:
            rows.append((number, Bad(_json_error(e))))
            continue
        rows.append(
            (number, obj if isinstance(obj, dict) else Bad(f"not an object (a JSON {type_name(obj)})"))
        )
    if not rows or not all(
        isinstance(obj, Bad) and obj.reason.startswith("not valid JSON") for _, obj in rows
    ):
        return rows
    # No line parses on its own: maybe one pretty-printed JSON object spanning many lines ({"data": [...]}).
    text = "\n".join(x for x in _lines(inp, data) if x is not None)
    return _whole_json_object(inp, text) or rows


def _whole_json_object(inp: Input, text: str) -> Rows | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    lists = [v for v in obj.values() if isinstance(v, list)]
    if len(obj) == 1 and len(lists) == 1:  # {"data": [...]} as some exporters write it
        inp.unit = "element"
        return _array_rows(lists[0])
    return [(1, obj)]


def _read_json_array(inp: Input, data: bytes) -> Rows:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PreftuneError(f"{inp.name} is not valid UTF-8 (line {line}); save it as UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PreftuneError(
            f"{inp.name} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "fix the file or write it "
            "as JSON Lines, one object per line, so that bad rows can be skipped"
        ) from None
    except (ValueError, RecursionError) as e:
        raise PreftuneError(f"{inp.name} is not valid JSON ({_json_error(e)})") from None
    if not isinstance(obj, list):
        raise PreftuneError(f"{inp.name} is not valid JSON")
    if not obj:
        raise PreftuneError(f"data file {inp.name} is empty (an empty JSON array)")
    return _array_rows(obj)


def _array_rows(items: list) -> Rows:
    rows: Rows = []
    for number, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            rows.append((number, Bad(f"not an object (a JSON {type_name(obj)})")))
        else:
            rows.append((number, obj))
    return rows


def _read_csv(inp: Input, data: bytes, delimiter: str) -> Rows:
    # Decode with surrogateescape so one bad byte costs one row, not the file; such rows are flagged below.
    try:
        text = data.decode("utf-8")
        lossy = False
    except UnicodeDecodeError:
        _lines(inp, data)  # raises if the file is mostly not UTF-8
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
                    raise PreftuneError(
                        f"the header of {inp.name} is not valid UTF-8; save the file as UTF-8"
                    )
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
            rows.append((line, {h: _csv_cell(c) for h, c in zip(header, cells)}))
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


def _read_parquet(inp: Input, data: bytes) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
        items = table.to_pylist()
    except Exception as e:  # pyarrow raises many types (ArrowInvalid, OSError, ...) for a corrupt file
        raise PreftuneError(
            f"{inp.name} does not look like a JSONL/JSON/CSV/Parquet data file "
            f"(Parquet reader: {_first_line(e)})"
        ) from None
    if not items:
        raise PreftuneError(f"data file {inp.name} is empty (a Parquet file with no rows)")
    return _array_rows(items)


def _read_saved_dataset(inp: Input, split: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_from_disk(str(inp.path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors for a broken folder
        raise PreftuneError(f"cannot load the saved dataset in {inp.name} ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PreftuneError(
                f"the saved dataset {inp.name} has no split {split!r}; it has {', '.join(ds.keys())}"
            )
        ds = ds[split]
        inp.name = f"{inp.name}[{split}]"
    items = ds.to_list()
    if not items:
        raise PreftuneError(f"the saved dataset {inp.name} is empty")
    return _array_rows(items)


def _read_hub(inp: Input, split: str) -> Rows:
    try:
        import datasets

        ds = datasets.load_dataset(inp.name, split=split)
        items = ds.to_list()
    except Exception as e:  # network, auth and "no such dataset" errors all mean the same to the user here
        raise PreftuneError(
            f"data path {inp.name} does not exist, and the hub dataset {inp.name} "
            f"(split {split!r}) could not be "
            f"loaded ({_first_line(e)}); check the path, or the dataset name and your network"
        ) from None
    if not items:
        raise PreftuneError(f"the hub dataset {inp.name} (split {split!r}) is empty")
    return _array_rows(items)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else type(e).__name__) or type(e).__name__


# ----------------------------------------------------------------------------------------------------------
