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

import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.detect import detect_layout
from preftune.data.fields import PromptTemplate, Skip
from preftune.data.layouts import LAYOUT_LABELS
from preftune.data.ranked import check_rule
from preftune.data.rows import CHUNK_ROWS, Bad, Input, Rows
from preftune.data.sources import iter_rows, resolve
from preftune.data.unpaired import summary_text, unpaired_checker
from preftune.data.validate import PREFERENCE_FORMATS, SFT_FORMATS, RowChecker, detect_format, glued
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
    count: int = -1  # valid records when `records` is not kept (a streamed load); -1: len(records)
    # pairs dropped because they hold nothing to train on (an empty answer, identical answers, a tie), by where
    skipped: list[InvalidRow] = field(default_factory=list)
    ranked: str = "best-vs-next"  # the rule that paired rows ranking more than two answers
    firsts: dict[str, str] = field(default_factory=dict)  # a note -> where it first happened ("glued": the row)

    def summary(self) -> str:
        """One line for the log: "loaded 1,000 pairs (standard) from 2 files; dropped 3 invalid rows: ..."."""
        n = self.count if self.count >= 0 and not self.records else len(self.records)
        noun = "pair" if self.kind == "preference" else "example"
        noun += "" if n == 1 else "s"
        n_src = len(self.sources)
        where = self.sources[0] if n_src == 1 else f"{n_src} files"
        label = LAYOUT_LABELS.get(self.layout)
        shape = self.format + (f", {label} layout" if label else "")
        text = f"loaded {n:,} {noun} ({shape}) from {where}"
        if self.kind == "unpaired":
            text += summary_text(self.notes)
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
        if self.skipped:
            n_skip = len(self.skipped)
            text += (f"; dropped {n_skip:,} pair{'s' if n_skip != 1 else ''} with nothing to train on: "
                     f"{_count_text(self.skipped)} (first: {self.skipped[0]})")
        rows, pairs = self.notes.get("ranked_rows", 0), self.notes.get("ranked_pairs", 0)
        if rows:
            text += (f"; {rows:,} row{'s' if rows != 1 else ''} ranked more than two answers: {self.ranked} made "
                     f"{pairs:,} pair{'s' if pairs != 1 else ''} of them (--ranked best-vs-next|best-vs-worst|all-pairs)")
        return text

    def warnings(self) -> list[str]:
        """Lines about the data a person should act on (printed by train and inspect)."""
        out = []
        n, total = self.notes.get("glued", 0), self.count if self.count >= 0 and not self.records else len(self.records)
        if n:
            noun = "pairs" if self.kind == "preference" else "examples"
            out.append(f"{n:,} of {total:,} {noun} run the prompt's last word into the answer's first with no space "
                       f"between ({self.firsts['glued']}): the tokenizer reads one word where two were meant; end "
                       "the prompts or begin the answers with a space or newline")
        return out


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
    split: str | None = None,
    ranked: str = "best-vs-next",
) -> LoadedData:
    """Load and validate preference (``kind="preference"``) or SFT (``kind="sft"``) records.

    Field names are paths into nested objects (``prompt_field="meta.question"``, ``"input.messages"``,
    ``"turns.0"`` for a list element); a key that literally contains the dot wins over the walk.
    ``prompt_template`` builds the prompt from several fields (``"{system}\\n\\n{question}"``, see
    `preftune.data.layouts.PromptTemplate`). With the default field names the layout (ShareGPT, OpenAI,
    Alpaca, ...) is detected from the rows' keys. ``format="auto"`` decides the format by a vote of the first
    rows; pass "standard", "conversational" or "implicit" (or "sft" / "preference-chosen" for SFT) to force one.

    ``split`` picks the split of a saved DatasetDict folder or a hub dataset (None: "train", or the only one).
    ``ranked`` pairs rows that rank more than two answers (`preftune.data.ranked`: "best-vs-next",
    "best-vs-worst", "all-pairs").

    Every row is validated. By default any invalid row raises `PreftuneError` listing the rows and reasons;
    with ``skip_invalid=True`` they are dropped and returned in ``LoadedData.invalid``. A source with no
    valid row, an empty, missing or binary file, sources of different formats and layouts preftune does not
    read (with the flag or format that does) always raise.
    """
    stream = RecordStream(source, kind=kind, format=format, prompt_field=prompt_field, chosen_field=chosen_field,
                          rejected_field=rejected_field, completion_field=completion_field,
                          prompt_template=prompt_template, skip_invalid=skip_invalid, split=split, ranked=ranked)
    records: list[dict] = []
    origins: list[str] = []
    for chunk in stream:
        records += chunk.records
        origins += chunk.origins
    return stream.finish(records, origins)


@dataclass
class Chunk:
    """Consecutive valid records of a `RecordStream` (`start`: the position of the first among all of them)."""

    records: list[dict]
    origins: list[str]
    start: int


class RecordStream:
    """`load_records` one chunk of records at a time, for data larger than memory.

    Iterating yields `Chunk`s in file order; `finish()` then raises what `load_records` raises at the end (mixed
    formats, mixed string/message rows, invalid rows without skip_invalid) or returns the `LoadedData` (with
    the records given to it, or only their count). Errors about one file (empty, no valid row, a layout
    preftune does not read) are raised while iterating, as `load_records` does. Once the end is sure to raise,
    `failed` is True, so a consumer can stop expensive work (tokenization) and let the rest be validated fast.
    """

    def __init__(self, source: str | Path | Sequence[str | Path], *, kind: str = "preference", format: str = "auto",
                 prompt_field: str = "prompt", chosen_field: str = "chosen", rejected_field: str = "rejected",
                 completion_field: str = "completion", prompt_template: str | None = None,
                 skip_invalid: bool = False, split: str | None = None, chunk_rows: int | None = None,
                 ranked: str = "best-vs-next"):
        if kind not in ("preference", "sft", "unpaired"):
            raise PreftuneError(f"unknown data kind {kind!r}; use 'preference', 'sft' or 'unpaired'")
        # unpaired examples: labelled rows, or pairs split in two (preftune.data.unpaired), whatever their format
        allowed = {"preference": PREFERENCE_FORMATS, "sft": SFT_FORMATS, "unpaired": PREFERENCE_FORMATS}[kind]
        if kind == "sft" and format in PREFERENCE_FORMATS:
            # one `format` setting serves train and sft: for SFT the string/message shape is read from each row
            format = "preference-chosen" if format == "implicit" else "auto"
        if format != "auto" and format not in allowed:
            raise PreftuneError(
                f"unknown data format {format!r} for {kind} data; use 'auto' or one of {', '.join(allowed)}"
            )
        # None: this module's CHUNK_ROWS, read now (so a test can make chunks small for every stream)
        self.kind, self.format, self.skip_invalid, self.split, self.chunk_rows = (kind, format, skip_invalid,
                                                                                  split, chunk_rows or CHUNK_ROWS)
        self.names = {"prompt": prompt_field, "chosen": chosen_field, "rejected": rejected_field,
                      "completion": completion_field}
        self.template = PromptTemplate.parse(prompt_template) if prompt_template is not None else None
        self.ranked = check_rule(ranked)
        self.inputs = resolve(source)
        self.invalid: list[InvalidRow] = []
        self.skipped: list[InvalidRow] = []
        self.firsts: dict[str, str] = {}
        self.formats: dict[str, str] = {}
        self.layouts: dict[str, str] = {}
        self.rows_per_source: dict[str, int] = {}
        self.notes: Counter[str] = Counter()
        self.shapes: set[bool] = set()
        self.count = 0

    @property
    def failed(self) -> bool:
        return ((bool(self.invalid) and not self.skip_invalid) or len(self.shapes) > 1
                or len(set(self.formats.values())) > 1)

    def __iter__(self) -> Iterator[Chunk]:
        for inp in self.inputs:
            yield from self._file(inp)

    def _file(self, inp: Input) -> Iterator[Chunk]:
        head = _Replay(iter_rows(inp, self.split, self.chunk_rows))
        if next(iter(head), None) is None:
            raise PreftuneError(f"data file {inp.name} is empty; it holds no rows")

        def every_row() -> Iterator[tuple[int, Any]]:  # without keeping them: a rare Alpaca question
            fresh = (row for rows in iter_rows(inp, self.split, self.chunk_rows) for row in rows)
            return itertools.chain(list(head.rows), itertools.islice(fresh, len(head.rows), None))

        # detection reads only as far as its votes need; those rows are validated first, then the rest
        if self.kind == "unpaired":
            layout, fmt, check = unpaired_checker(head, self.names, self.template, inp.name, every_row, self.ranked,
                                                  self.format, self.notes)
        else:
            layout = detect_layout(head, self.kind, self.names, self.template, inp.name, every_row, self.ranked)
            fmt = self.format if self.format != "auto" else detect_format(head, self.kind, layout)
            check = RowChecker(self.kind, fmt, layout, self.notes)
        self.formats[inp.name], self.layouts[inp.name] = fmt, layout.name
        first_dict = None
        n_rows = n_valid = 0
        skipped_before = len(self.skipped)
        file_invalid: list[InvalidRow] = []
        for rows in head.then_rest():
            n_rows += len(rows)
            records: list[dict] = []
            origins: list[str] = []
            for number, obj in rows:
                if first_dict is None and isinstance(obj, dict):
                    first_dict = obj
                out = obj.reason if isinstance(obj, Bad) else check(obj)
                if isinstance(out, str):
                    file_invalid.append(InvalidRow(inp.name, number, out, inp.unit))
                    self.invalid.append(file_invalid[-1])
                    continue
                where = f"{inp.name} {inp.unit} {number}"
                for k, one in enumerate(out, start=1):
                    if isinstance(one, Skip):
                        self.skipped.append(InvalidRow(inp.name, number, one.reason, inp.unit))
                        continue
                    records.append(one)
                    origins.append(where + (f" pair {k}" if len(out) > 1 else ""))
                    if glued(one):
                        self.notes["glued"] += 1
                        self.firsts.setdefault("glued", f"{where}: ...{_tail(one['prompt'])!r} + "
                                                        f"{_head(one.get('chosen', one.get('completion')))!r}...")
            if records:
                self.shapes.update(isinstance(r["prompt"], list) for r in records)
                yield Chunk(records, origins, self.count)
                self.count += len(records)
                n_valid += len(records)
        if not n_valid and len(self.skipped) > skipped_before and not file_invalid:
            raise PreftuneError(f"{inp.name} has no pair to train on: all {n_rows:,} rows hold an empty answer, "
                                f"identical answers or a tie ({_count_text(self.skipped[skipped_before:])})")
        if not n_valid:
            raise PreftuneError(_no_valid_rows_message(inp, n_rows, first_dict, file_invalid))
        self.rows_per_source[inp.name] = n_rows

    def finish(self, records: list[dict] | None = None, origins: list[str] | None = None) -> LoadedData:
        """The end of `load_records`: its final checks, then the `LoadedData` (records as given, if any)."""
        distinct = sorted(set(self.formats.values()))
        if len(distinct) > 1:
            listing = "; ".join(f"{name}: {fmt}" for name, fmt in self.formats.items())
            raise PreftuneError(
                f"the data files mix formats ({listing}); convert them to one format or load them separately"
            )
        if len(self.shapes) > 1:
            raise PreftuneError(
                "the data mixes string rows and message-list rows; convert them to one format or load them separately"
            )
        if self.invalid and not self.skip_invalid:
            raise PreftuneError(_invalid_message(self.invalid, sum(self.rows_per_source.values())))
        return LoadedData(records if records is not None else [], self.invalid, distinct[0],
                          [i.name for i in self.inputs], self.kind, self.shapes == {True}, self.rows_per_source,
                          origins if origins is not None else [], "+".join(dict.fromkeys(self.layouts.values())),
                          dict(self.notes), count=self.count, skipped=self.skipped, ranked=self.ranked,
                          firsts=dict(self.firsts))


class _Replay:
    """Rows of one file read chunk by chunk on demand and kept, so that format detection can read as far as
    it needs and validation then starts again from the first row (`then_rest`)."""

    def __init__(self, chunks: Iterator[Rows]):
        self.chunks, self.rows = chunks, []

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        i = 0
        while True:
            while i < len(self.rows):
                yield self.rows[i]
                i += 1
            more = next(self.chunks, None)
            if more is None:
                return
            self.rows += more

    def then_rest(self) -> Iterator[Rows]:
        """The kept rows (as one chunk) and then the chunks nobody has read yet."""
        kept, self.rows = self.rows, []
        if kept:
            yield kept
        yield from self.chunks


# ----------------------------------------------------------------------------------------------------------
# messages


def _tail(text: str, width: int = 20) -> str:
    return text[-width:]


def _head(text: Any, width: int = 20) -> str:
    return text[:width] if isinstance(text, str) else ""


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


def _no_valid_rows_message(inp: Input, n_rows: int, first: dict | None, invalid: Sequence[InvalidRow]) -> str:
    n = f"{n_rows:,} row{'s' if n_rows != 1 else ''}"
    lines = [f"{inp.name} has no valid rows ({n}, all invalid: {_count_text(invalid)})"]
    lines += [f"  {row}" for row in invalid[:MAX_LISTED]]
    if len(invalid) > MAX_LISTED:
        lines.append(f"  ... and {len(invalid) - MAX_LISTED:,} more")
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
