"""Load preference (or SFT) data and validate every row at the door: the public entry points.

One loader serves `preftune train`, `preftune sft` and `preftune inspect`, so that the rows a user audits are
exactly the rows that get trained on. Everything here runs before any model is loaded: a bad row costs the
user a second, not the minutes it takes to load a model and tokenize.

The work is split by job: `preftune.data.sources` reads files, folders, globs, saved datasets and the hub into
raw rows; `preftune.data.layouts` finds where a row keeps its prompt and answers (plain fields, ShareGPT,
OpenAI, Alpaca, a prompt template); `preftune.data.validate` checks each row and normalises it to a record
(`preftune.data.implicit` splits implicit prompts). See `preftune.data.validate` for the record shapes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from preftune.data.layouts import LAYOUT_LABELS, PromptTemplate, detect_layout
from preftune.data.sources import Bad, Input, Rows, read_rows, resolve
from preftune.data.stats import value_key
from preftune.data.validate import PREFERENCE_FORMATS, SFT_FORMATS, RowChecker, detect_format
from preftune.errors import PreftuneError

# How many invalid rows an error message lists one per line before it says "and N more".
MAX_LISTED = 10


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
    (implicit data can be either). ``layout`` names where the rows kept their parts ("fields", "sharegpt",
    "openai", "alpaca", "messages"). ``notes`` counts what was done to valid rows: "prompt_at_turn" and
    "prompt_at_prefix" (implicit text prompts split after an assistant-turn marker, or at the plain shared
    prefix because the text has no turn markers) and "repeated_prompt" (answers that repeated the prompt's
    messages, dropped once).
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
    layout: str = "fields"
    notes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log: "loaded 1,000 pairs (standard) from 2 files; dropped 3 invalid rows: ..."."""
        noun = "pair" if self.kind == "preference" else "example"
        noun += "" if len(self.records) == 1 else "s"
        n_src = len(self.sources)
        where = self.sources[0] if n_src == 1 else f"{n_src} files"
        label = LAYOUT_LABELS.get(self.layout)
        shape = self.format + (f", {label} layout" if label else "")
        text = f"loaded {len(self.records):,} {noun} ({shape}) from {where}"
        if self.invalid:
            text += f"; dropped {len(self.invalid):,} invalid row{'s' if len(self.invalid) != 1 else ''}: "
            text += _count_text(self.invalid)
        turn, prefix = self.notes.get("prompt_at_turn", 0), self.notes.get("prompt_at_prefix", 0)
        if turn or prefix:
            text += (f"; implicit prompts end after the last assistant turn in {turn:,} rows and fell back to the "
                     f"plain shared prefix (no turn markers) in {prefix:,}")
        if self.notes.get("repeated_prompt"):
            text += (f"; chosen/rejected repeated the prompt's messages in {self.notes['repeated_prompt']:,} rows "
                     "(used once)")
        return text


def load_records(
    source: str | Path | Sequence[str | Path],
    *,
    kind: str = "preference",
    format: str = "auto",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    completion_field: str = "completion",
    prompt_template: str | None = None,
    skip_invalid: bool = False,
    split: str = "train",
) -> LoadedData:
    """Load and validate preference (``kind="preference"``) or SFT (``kind="sft"``) records.

    Field names are paths into nested objects (``prompt_field="meta.question"``, ``"input.messages"``,
    ``"turns.0"`` for a list element); a key that literally contains the dot wins over the walk.
    ``prompt_template`` builds the prompt from several fields (``"{system}\\n\\n{question}"``, see
    `preftune.data.layouts.PromptTemplate`). With the default field names the layout (ShareGPT, OpenAI,
    Alpaca, ...) is detected from the rows' keys. ``format="auto"`` decides the format by a vote of the first
    rows; pass "standard", "conversational" or "implicit" (or "sft" / "preference-chosen" for SFT) to force one.

    Every row is validated. By default any invalid row raises `PreftuneError` listing the rows and reasons;
    with ``skip_invalid=True`` they are dropped and returned in ``LoadedData.invalid``. A source with no
    valid row, an empty, missing or binary file, sources of different formats and layouts preftune does not
    read (with the flag or format that does) always raise.
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
    names = {"prompt": prompt_field, "chosen": chosen_field, "rejected": rejected_field,
             "completion": completion_field}
    template = PromptTemplate.parse(prompt_template) if prompt_template is not None else None

    records: list[dict] = []
    invalid: list[InvalidRow] = []
    formats: dict[str, str] = {}
    layouts: dict[str, str] = {}
    rows_per_source: dict[str, int] = {}
    origins: list[str] = []
    notes: Counter[str] = Counter()
    inputs = resolve(source)
    for inp in inputs:
        rows = read_rows(inp, split)
        if not rows:
            raise PreftuneError(f"data file {inp.name} is empty; it holds no rows")
        layout = detect_layout(rows, kind, names, template, inp.name)
        fmt = format if format != "auto" else detect_format(rows, kind, layout)
        n_before = len(records)
        file_invalid = _check_rows(inp, rows, RowChecker(kind, fmt, layout, notes), records, origins)
        if len(records) == n_before:
            raise PreftuneError(_no_valid_rows_message(inp, rows, file_invalid))
        formats[inp.name], layouts[inp.name] = fmt, layout.name
        rows_per_source[inp.name] = len(rows)
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
    return LoadedData(records, invalid, distinct[0], [i.name for i in inputs], kind, shapes == {True},
                      rows_per_source, origins, "+".join(dict.fromkeys(layouts.values())), dict(notes))


def _check_rows(inp: Input, rows: Rows, check: RowChecker, records: list[dict], origins: list[str]) -> list[InvalidRow]:
    """Append the valid rows' records and origins; return the invalid rows."""
    invalid = []
    for number, obj in rows:
        out = obj.reason if isinstance(obj, Bad) else check(obj)
        if isinstance(out, str):
            invalid.append(InvalidRow(inp.name, number, out, inp.unit))
        else:
            records.append(out)
            origins.append(f"{inp.name} {inp.unit} {number}")
    return invalid


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
        groups.setdefault(value_key(rec.get("prompt")), []).append(i)
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


def _no_valid_rows_message(inp: Input, rows: Rows, invalid: Sequence[InvalidRow]) -> str:
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
