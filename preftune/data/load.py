"""Read preference (or SFT) data from files, folders or the hub, and validate every row at the door.

One loader serves `preftune train`, `preftune sft` and `preftune inspect`, so that the rows a user audits are
exactly the rows that get trained on. Everything here runs before any model is loaded: a bad row costs the
user a second, not the minutes it takes to load a model and tokenize.

Supported inputs (``source``):

* ``.jsonl`` / ``.json`` files: JSON Lines or one JSON array, told apart by the first non-space character;
  gzip-compressed files are read transparently;
* ``.csv`` / ``.tsv`` files with a header row (cells that hold a JSON list of messages are decoded);
* ``.parquet`` files;
* a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder: ``split`` picks one);
* a folder of data files, a glob (``data/*.jsonl``) or a list of any of these;
* a hub dataset ``owner/name``, only when the string is not an existing path.

Record shapes returned (``kind="preference"``):

* standard: ``{"prompt": str, "chosen": str, "rejected": str}`` (chosen/rejected are completions only);
* conversational: ``{"prompt": list[msg], "chosen": list[msg], "rejected": list[msg]}``,
  msg = ``{"role", "content"}``;
* implicit prompt (no prompt field): the shared beginning of chosen and rejected becomes the prompt,
  giving one of the two shapes above.

``kind="sft"`` returns ``{"prompt": ..., "completion": ...}`` from prompt/completion data, or from preference
data by taking chosen as the completion (the DPO paper's "Preferred-FT" baseline, Rafailov et al., 2023, §6).
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

# A row this long is almost always a concatenation accident (a missing newline between thousands of rows);
# refusing it early keeps one bad line from costing gigabytes of tokenizer memory.
MAX_ROW_CHARS = 1_000_000
# How many invalid rows an error message lists one per line before it says "and N more".
MAX_LISTED = 10
# How many parsed rows vote on the data format; enough to outvote a few broken rows at the top of a file.
FORMAT_VOTERS = 1000

PREFERENCE_FORMATS = ("standard", "conversational", "implicit")
SFT_FORMATS = ("sft", "preference-chosen")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz", ".txt", ".ndjson")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_MISSING = object()


@dataclass
class InvalidRow:
    """One row that failed validation: where it is and why.

    ``row`` is 1-based: the line number in a JSONL file, the line on which a CSV row starts (the header is
    line 1, so the first data row is line 2), the element index in a JSON array, the row index in a Parquet
    file or a ``datasets`` folder. ``unit`` says which of those it is, for the message.
    """

    source: str
    row: int
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.source} {self.unit} {self.row}: {self.reason}"

    @property
    def category(self) -> str:
        """The reason without its details, e.g. "not valid JSON" for "not valid JSON (Expecting ...)"."""
        return _category(self.reason)


@dataclass
class LoadedData:
    """What `load_records` returns: the normalised records and the rows it dropped.

    ``format`` is the source format ("standard" | "conversational" | "implicit" for preference data, "sft" |
    "preference-chosen" for ``kind="sft"``); ``conversational`` says whether the records hold message lists
    (implicit data can be either).
    """

    records: list[dict]
    invalid: list[InvalidRow]
    format: str
    sources: list[str]
    kind: str = "preference"
    conversational: bool = False
    rows_per_source: dict[str, int] = field(default_factory=dict)
    # where each record came from ("data/train.jsonl line 7"), parallel to `records`, for reports
    origins: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log: "loaded 1,000 pairs (standard) from 2 files; dropped 3 invalid rows: ..."."""
        noun = "pair" if self.kind == "preference" else "example"
        noun += "" if len(self.records) == 1 else "s"
        n_src = len(self.sources)
        where = self.sources[0] if n_src == 1 else f"{n_src} files"
        text = f"loaded {len(self.records):,} {noun} ({self.format}) from {where}"
        if self.invalid:
            text += f"; dropped {len(self.invalid):,} invalid row{'s' if len(self.invalid) != 1 else ''}: "
            text += _count_text(self.invalid)
        return text


# ----------------------------------------------------------------------------------------------------------
# public entry points


def load_records(
    source: str | Path | Sequence[str | Path],
    *,
    kind: str = "preference",
    format: str = "auto",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    completion_field: str = "completion",
    skip_invalid: bool = False,
    split: str = "train",
) -> LoadedData:
    """Load and validate preference (``kind="preference"``) or SFT (``kind="sft"``) records.

    Field names may be dotted paths into nested objects (``prompt_field="meta.question"``); a key that
    literally contains the dot wins over the nested lookup. ``format="auto"`` decides the format by a vote of
    the first rows; pass "standard", "conversational" or "implicit" (or "sft" / "preference-chosen" for SFT)
    to force one.

    Every row is validated. By default any invalid row raises `PreftuneError` listing the rows and reasons;
    with ``skip_invalid=True`` they are dropped and returned in ``LoadedData.invalid``. A source with no
    valid row, an empty, missing or binary file, and sources of different formats always raise.
    """
    if kind not in ("preference", "sft"):
        raise PreftuneError(f"unknown data kind {kind!r}; use 'preference' or 'sft'")
    allowed = PREFERENCE_FORMATS if kind == "preference" else SFT_FORMATS
    if kind == "sft" and format in PREFERENCE_FORMATS:
        # one `format` setting serves train and sft: for SFT the string/message shape is read from each row
        format = "preference-chosen" if format == "implicit" else "auto"
    if format != "auto" and format not in allowed:
        raise PreftuneError(
            f"unknown data format {format!r} for {kind} data; use 'auto' or one of {', '.join(allowed)}"
        )
    fields = _Fields(prompt_field, chosen_field, rejected_field, completion_field)

    inputs = _resolve(source)
    records: list[dict] = []
    invalid: list[InvalidRow] = []
    formats: dict[str, str] = {}
    rows_per_source: dict[str, int] = {}
    origins: list[str] = []
    for inp in inputs:
        rows = _read(inp, split)
        if not rows:
            raise PreftuneError(f"data file {inp.name} is empty; it holds no rows")
        fmt = format if format != "auto" else _detect_format(rows, kind, fields)
        check = _make_checker(kind, fmt, fields)
        file_records: list[dict] = []
        file_invalid: list[InvalidRow] = []
        for number, obj in rows:
            if isinstance(obj, _Bad):
                file_invalid.append(InvalidRow(inp.name, number, obj.reason, inp.unit))
                continue
            out = check(obj)
            if isinstance(out, str):
                file_invalid.append(InvalidRow(inp.name, number, out, inp.unit))
            else:
                file_records.append(out)
                origins.append(f"{inp.name} {inp.unit} {number}")
        if not file_records:
            raise PreftuneError(_no_valid_rows_message(inp, rows, file_invalid, fields))
        formats[inp.name] = fmt
        rows_per_source[inp.name] = len(rows)
        records.extend(file_records)
        invalid.extend(file_invalid)

    distinct = sorted(set(formats.values()))
    if len(distinct) > 1:
        listing = "; ".join(f"{name}: {fmt}" for name, fmt in formats.items())
        raise PreftuneError(
            f"the data files mix formats ({listing}); convert them to one format or load them separately"
        )
    shapes = {isinstance(r["prompt"], list) for r in records}
    if len(shapes) > 1:
        raise PreftuneError(
            "the data mixes string rows and message-list rows; "
            "convert them to one format or load them separately"
        )
    if invalid and not skip_invalid:
        raise PreftuneError(_invalid_message(invalid, sum(rows_per_source.values())))
    conversational = shapes == {True}
    return LoadedData(
        records,
        invalid,
        distinct[0],
        [i.name for i in inputs],
        kind,
        conversational,
        rows_per_source,
        origins,
    )


def split_records(
    records: Sequence[dict], eval_fraction: float, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Split records into (train, eval) deterministically, never putting one prompt on both sides.

    Records are grouped by prompt (pairs sharing a prompt would leak the prompt into eval otherwise); groups
    are ordered by a hash of (seed, prompt), which does not depend on the record order or Python's hash salt,
    and taken into eval while they fit into ``round(eval_fraction * len(records))`` (at least 1) records. Both
    lists keep the records' original order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise PreftuneError(f"eval fraction {eval_fraction} is out of range; use a number in [0, 1)")
    if eval_fraction == 0.0 or not records:
        return list(records), []
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(_prompt_key(rec.get("prompt")), []).append(i)
    if len(groups) < 2:
        raise PreftuneError(
            f"cannot hold out an eval split: all {len(records)} records share one prompt; use eval fraction 0"
        )
    target = max(1, round(eval_fraction * len(records)))

    def rank(key: str) -> str:
        return hashlib.sha256(f"{seed}\x00{key}".encode("utf-8", "surrogatepass")).hexdigest()

    order = sorted(groups, key=rank)
    chosen_keys: list[str] = []
    taken = 0
    for key in order:
        if taken + len(groups[key]) <= target:
            chosen_keys.append(key)
            taken += len(groups[key])
        if taken >= target:
            break
    if not chosen_keys:  # every group is larger than the target: take the smallest, ties broken by rank
        chosen_keys = [min(order, key=lambda k: len(groups[k]))]
    if len(chosen_keys) == len(groups):
        chosen_keys = chosen_keys[:-1]
    in_eval = {i for key in chosen_keys for i in groups[key]}
    train = [r for i, r in enumerate(records) if i not in in_eval]
    held = [r for i, r in enumerate(records) if i in in_eval]
    return train, held


# ----------------------------------------------------------------------------------------------------------
# resolving sources


@dataclass
class _Input:
    name: str  # as shown in messages
    path: Path | None
    how: str  # "file" | "disk" | "hub"
    unit: str = "line"


def _resolve(source: str | Path | Sequence[str | Path]) -> list[_Input]:
    if isinstance(source, (str, Path)):
        items = [source]
    elif isinstance(source, Sequence):
        items = list(source)
        if not items:
            raise PreftuneError("no data files given; pass a file, a folder, a glob or a hub dataset name")
    else:
        raise PreftuneError(f"data source must be a path or a list of paths, not {type(source).__name__}")
    out: list[_Input] = []
    seen: set[str] = set()
    for item in items:
        for inp in _resolve_one(item):
            if inp.name not in seen:
                seen.add(inp.name)
                out.append(inp)
    return out


def _resolve_one(item: str | Path) -> list[_Input]:
    if not isinstance(item, (str, Path)):
        raise PreftuneError(f"data source must be a path, not {type(item).__name__}")
    text = str(item)
    if not text.strip():
        raise PreftuneError("the data path is empty; pass a file, a folder, a glob or a hub dataset name")
    path = Path(text).expanduser()
    if path.is_file():
        return [_Input(text, path, "file")]
    if path.is_dir():
        if _is_saved_dataset(path):
            return [_Input(text, path, "disk", "row")]
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_data_name(p))
        if not files:
            raise PreftuneError(
                f"data folder {text} holds no .jsonl/.json/.csv/.parquet files and is not a saved dataset"
            )
        return [_Input(str(p), p, "file") for p in files]
    if _GLOB_CHARS.search(text):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise PreftuneError(f"no data files match {text}")
        return [_Input(str(p), p, "file") for p in files]
    if _HUB_NAME.match(text) and not text.lower().endswith(DATA_SUFFIXES):
        return [_Input(text, None, "hub", "row")]
    raise PreftuneError(f"data file {text} does not exist")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _is_data_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(DATA_SUFFIXES) and not name.startswith(".")


# ----------------------------------------------------------------------------------------------------------
# reading rows: each reader returns [(row number, dict-or-_Bad)], never raises anything but PreftuneError


@dataclass
class _Bad:
    reason: str


_Rows = list[tuple[int, Any]]


def _read(inp: _Input, split: str) -> _Rows:
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


def _lines(inp: _Input, data: bytes) -> list[str | None]:
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


def _read_jsonl(inp: _Input, data: bytes) -> _Rows:
    rows: _Rows = []
    loads = json.loads
    for number, line in enumerate(_lines(inp, data), start=1):
        if line is None:
            rows.append((number, _Bad("invalid UTF-8")))
            continue
        if not line.strip():
            continue
        if len(line) > MAX_ROW_CHARS:
            rows.append((number, _Bad(f"row longer than {MAX_ROW_CHARS:,} characters ({len(line):,})")))
            continue
        try:
            obj = loads(line)
        except (ValueError, RecursionError) as e:
            rows.append((number, _Bad(_json_error(e))))
            continue
        rows.append(
            (number, obj if isinstance(obj, dict) else _Bad(f"not an object (a JSON {_type_name(obj)})"))
        )
    if not rows or not all(
        isinstance(obj, _Bad) and obj.reason.startswith("not valid JSON") for _, obj in rows
    ):
        return rows
    # No line parses on its own: maybe one pretty-printed JSON object spanning many lines ({"data": [...]}).
    text = "\n".join(x for x in _lines(inp, data) if x is not None)
    return _whole_json_object(inp, text) or rows


def _whole_json_object(inp: _Input, text: str) -> _Rows | None:
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


def _read_json_array(inp: _Input, data: bytes) -> _Rows:
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


def _array_rows(items: list) -> _Rows:
    rows: _Rows = []
    for number, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            rows.append((number, _Bad(f"not an object (a JSON {_type_name(obj)})")))
        else:
            rows.append((number, obj))
    return rows


def _read_csv(inp: _Input, data: bytes, delimiter: str) -> _Rows:
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
    rows: _Rows = []
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
                rows.append((line, _Bad("invalid UTF-8")))
                continue
            size = sum(len(c) for c in cells)
            if size > MAX_ROW_CHARS:
                rows.append((line, _Bad(f"row longer than {MAX_ROW_CHARS:,} characters ({size:,})")))
                continue
            if len(cells) != len(header):
                rows.append((line, _Bad(f"has {len(cells)} fields, the header has {len(header)}")))
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


def _read_parquet(inp: _Input, data: bytes) -> _Rows:
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


def _read_saved_dataset(inp: _Input, split: str) -> _Rows:
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


def _read_hub(inp: _Input, split: str) -> _Rows:
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
# format detection and per-row checks


@dataclass
class _Fields:
    prompt: str
    chosen: str
    rejected: str
    completion: str


def _get(obj: dict, path: str) -> Any:
    """obj[path], else the dotted path walked through nested dicts (and list indices); _MISSING if absent."""
    if path in obj:
        return obj[path]
    if "." not in path:
        return _MISSING
    cur: Any = obj
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def _detect_format(rows: _Rows, kind: str, f: _Fields) -> str:
    votes: Counter[str] = Counter()
    for _, obj in rows:
        if isinstance(obj, _Bad):
            continue
        if kind == "sft":
            if _get(obj, f.completion) is not _MISSING:
                votes["sft"] += 1
            elif _get(obj, f.chosen) is not _MISSING:
                votes["preference-chosen"] += 1
        else:
            prompt, chosen = _get(obj, f.prompt), _get(obj, f.chosen)
            # a prompt field the user named is never "implicit": a missing one must be reported as missing
            if prompt is _MISSING and f.prompt == "prompt":
                votes["implicit"] += 1
            elif isinstance(chosen, list) or isinstance(prompt, list):
                votes["conversational"] += 1
            else:
                votes["standard"] += 1
        if sum(votes.values()) >= FORMAT_VOTERS:
            break
    order = SFT_FORMATS if kind == "sft" else PREFERENCE_FORMATS
    if not votes:
        return order[0]
    best = max(votes.values())
    return next(fmt for fmt in order if votes[fmt] == best)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)


def _text(obj: dict, name: str) -> str | tuple[str]:
    """The string field `name`, or (reason,) when it is missing, not a string or empty."""
    value = _get(obj, name)
    if value is _MISSING:
        return (f"missing field '{name}'",)
    if not isinstance(value, str):
        return (f"field '{name}' is {_type_name(value)}, expected a string",)
    if not value.strip():
        return (f"field '{name}' is empty",)
    return value


def _messages(obj: dict, name: str, *, allow_string: str | None = None) -> list[dict] | tuple[str]:
    """The message-list field `name` normalised to [{"role", "content"}], or (reason,).

    `allow_string` is the role a plain string is wrapped into (a string prompt next to message completions).
    """
    value = _get(obj, name)
    if value is _MISSING:
        return (f"missing field '{name}'",)
    if isinstance(value, str) and allow_string:
        if not value.strip():
            return (f"field '{name}' is empty",)
        return [{"role": allow_string, "content": value}]
    if not isinstance(value, list):
        return (f"field '{name}' is {_type_name(value)}, expected a list of messages",)
    if not value:
        return (f"field '{name}' is empty",)
    out = []
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict):
            return (
                f"field '{name}' message {i} is {_type_name(msg)}, expected an object with role and content",
            )
        role, content = msg.get("role", _MISSING), msg.get("content", _MISSING)
        if role is _MISSING or content is _MISSING:
            missing = "role" if role is _MISSING else "content"
            return (f"field '{name}' message {i} has no '{missing}'",)
        if not isinstance(role, str) or not role:
            return (f"field '{name}' message {i} role is {_type_name(role)}, expected a string",)
        if not isinstance(content, str):
            return (f"field '{name}' message {i} content is {_type_name(content)}, expected a string",)
        out.append({"role": role, "content": content})
    return out


def _too_long(*values: Any) -> str | None:
    size = 0
    for v in values:
        if isinstance(v, str):
            size += len(v)
        elif isinstance(v, list):
            size += sum(len(m["content"]) for m in v)
    if size > MAX_ROW_CHARS:
        return f"row longer than {MAX_ROW_CHARS:,} characters ({size:,})"
    return None


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix, by binary search over C-speed slice comparisons."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_implicit_prompt(chosen: str, rejected: str) -> int:
    """Where the shared prompt of two implicit-prompt strings ends (0 if they share no whole word).

    Take the longest common prefix, back off to a whitespace boundary so no word is cut ("The answer is bl"
    becomes "The answer is "), then hand trailing spaces/tabs (not newlines) to the completions, as TRL's
    `extract_prompt` does: BPE vocabularies spell a word with its leading space (" Paris"), so the completion
    should start with it.
    """
    k = _common_prefix_len(chosen, rejected)
    if k == len(chosen) == len(rejected):
        return k

    def boundary(i: int) -> bool:
        if i == 0 or chosen[i - 1].isspace():
            return True
        # the next character is a space in both strings (they may differ there only in which space it is)
        return i < len(chosen) and i < len(rejected) and chosen[i].isspace() and rejected[i].isspace()

    while k > 0 and not boundary(k):
        k -= 1
    while k > 0 and chosen[k - 1] in " \t":
        k -= 1
    return k


def _make_checker(kind: str, fmt: str, f: _Fields) -> Callable[[dict], dict | str]:
    """A function row -> normalised record, or the reason (a str) the row is invalid."""

    def pair(obj: dict, conversational: bool) -> tuple | str:
        if conversational:
            prompt = _messages(obj, f.prompt, allow_string="user")
            chosen = _messages(obj, f.chosen, allow_string="assistant")
            rejected = _messages(obj, f.rejected, allow_string="assistant")
        else:
            prompt, chosen, rejected = _text(obj, f.prompt), _text(obj, f.chosen), _text(obj, f.rejected)
        for v in (prompt, chosen, rejected):
            if isinstance(v, tuple):
                return v[0]
        return prompt, chosen, rejected

    def standard(obj: dict) -> dict | str:
        prompt = _get(obj, f.prompt)
        chosen = _get(obj, f.chosen)
        # a message-list row in string data: name the real problem instead of "is list, expected a string"
        if isinstance(prompt, list) or isinstance(chosen, list):
            return "row is conversational (message lists) but the data is standard (strings); mixed formats"
        out = pair(obj, False)
        if isinstance(out, str):
            return out
        p, c, r = out
        if c == r:
            return "chosen is identical to rejected"
        return _too_long(p, c, r) or {"prompt": p, "chosen": c, "rejected": r}

    def conversational(obj: dict) -> dict | str:
        prompt, chosen = _get(obj, f.prompt), _get(obj, f.chosen)
        if isinstance(prompt, str) and isinstance(chosen, str):
            return "row is standard (strings) but the data is conversational (message lists); mixed formats"
        out = pair(obj, True)
        if isinstance(out, str):
            return out
        p, c, r = out
        if c == r:
            return "chosen is identical to rejected"
        return _too_long(p, c, r) or {"prompt": p, "chosen": c, "rejected": r}

    def implicit_parts(obj: dict) -> tuple | str:
        """(prompt, chosen, rejected) split off the shared beginning of chosen and rejected."""
        chosen_v = _get(obj, f.chosen)
        if isinstance(chosen_v, list):
            c = _messages(obj, f.chosen)
            r = _messages(obj, f.rejected)
            for v in (c, r):
                if isinstance(v, tuple):
                    return v[0]
            if c == r:
                return "chosen is identical to rejected"
            k = _common_prefix_len(c, r)
            if k == 0:
                return "chosen and rejected share no leading messages, so there is no prompt"
            p, c, r = c[:k], c[k:], r[k:]
        else:
            c, r = _text(obj, f.chosen), _text(obj, f.rejected)
            for v in (c, r):
                if isinstance(v, tuple):
                    return v[0]
            if c == r:
                return "chosen is identical to rejected"
            k = split_implicit_prompt(c, r)
            if k == 0:
                return "chosen and rejected share no leading text, so there is no prompt"
            p, c, r = c[:k], c[k:], r[k:]
        if not c or (isinstance(c, str) and not c.strip()):
            return "chosen is empty after removing the shared prompt"
        if not r or (isinstance(r, str) and not r.strip()):
            return "rejected is empty after removing the shared prompt"
        return p, c, r

    def implicit(obj: dict) -> dict | str:
        out = implicit_parts(obj)
        if isinstance(out, str):
            return out
        p, c, r = out
        return _too_long(p, c, r) or {"prompt": p, "chosen": c, "rejected": r}

    def sft(obj: dict) -> dict | str:
        prompt, completion = _get(obj, f.prompt), _get(obj, f.completion)
        if isinstance(prompt, list) or isinstance(completion, list):
            p = _messages(obj, f.prompt, allow_string="user")
            c = _messages(obj, f.completion, allow_string="assistant")
        else:
            p, c = _text(obj, f.prompt), _text(obj, f.completion)
        for v in (p, c):
            if isinstance(v, tuple):
                return v[0]
        return _too_long(p, c) or {"prompt": p, "completion": c}

    def preference_chosen(obj: dict) -> dict | str:
        if _get(obj, f.prompt) is _MISSING and _get(obj, f.rejected) is not _MISSING:
            out = implicit_parts(obj)  # implicit-prompt preference data: the shared beginning is the prompt
            if isinstance(out, str):
                return out
            p, c = out[0], out[1]
        else:
            prompt, chosen = _get(obj, f.prompt), _get(obj, f.chosen)
            if isinstance(prompt, list) or isinstance(chosen, list):
                p = _messages(obj, f.prompt, allow_string="user")
                c = _messages(obj, f.chosen, allow_string="assistant")
            else:
                p, c = _text(obj, f.prompt), _text(obj, f.chosen)
            for v in (p, c):
                if isinstance(v, tuple):
                    return v[0]
        return _too_long(p, c) or {"prompt": p, "completion": c}

    return {
        "standard": standard,
        "conversational": conversational,
        "implicit": implicit,
        "sft": sft,
        "preference-chosen": preference_chosen,
    }[fmt]


# ----------------------------------------------------------------------------------------------------------
# messages


def _category(reason: str) -> str:
    return reason.split(" (", 1)[0]


def _count_text(invalid: Sequence[InvalidRow]) -> str:
    counts = Counter(_category(r.reason) for r in invalid)
    return ", ".join(f"{n:,} {reason}" for reason, n in counts.most_common())


def _invalid_message(invalid: Sequence[InvalidRow], total: int) -> str:
    lines = [f"{len(invalid):,} of {total:,} data rows are invalid: {_count_text(invalid)}"]
    lines += [f"  {row}" for row in invalid[:MAX_LISTED]]
    if len(invalid) > MAX_LISTED:
        lines.append(f"  ... and {len(invalid) - MAX_LISTED:,} more")
    lines.append("fix these rows or pass --skip-invalid to drop them")
    return "\n".join(lines)


def _no_valid_rows_message(inp: _Input, rows: _Rows, invalid: Sequence[InvalidRow], f: _Fields) -> str:
    n = f"{len(rows):,} row{'s' if len(rows) != 1 else ''}"
    lines = [f"{inp.name} has no valid rows ({n}, all invalid: {_count_text(invalid)})"]
    lines += [f"  {row}" for row in invalid[:MAX_LISTED]]
    if len(invalid) > MAX_LISTED:
        lines.append(f"  ... and {len(invalid) - MAX_LISTED:,} more")
    first = next((obj for _, obj in rows if isinstance(obj, dict)), None)
    missing = sorted({r.reason.split("'")[1] for r in invalid if r.reason.startswith("missing field '")})
    if first is not None and missing:
        lines.append(
            f"its rows have the fields {', '.join(map(str, first.keys()))}, "
            f"not {', '.join(map(repr, missing))}; "
            "name yours with --prompt-field/--chosen-field/--rejected-field (or --completion-field)"
        )
    else:
        lines.append("fix the file or check that it is the data you meant")
    return "\n".join(lines)


def _prompt_key(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)
