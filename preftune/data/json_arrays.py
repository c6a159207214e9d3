"""JSON array files read one element at a time, so that a data set of any size is never held whole.

The standard library's `json.JSONDecoder.raw_decode` parses each element from a text buffer that is refilled a block
at a time (an element cut by the block's end is parsed again with the next block); an element over
`preftune.data.rows.MAX_LINE_BYTES` ends the file with one sentence. Errors cite the line and column as
`json.loads` would.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import BinaryIO

from preftune.data.readers import BLOCK, SURROGATE_ESCAPE, row
from preftune.data.rows import MAX_LINE_BYTES, MAX_ROW_CHARS, Input, Rows, nul_error, too_long_row
from preftune.errors import PreftuneError

_SPACE = re.compile(r"[ \t\r\n]*")


class _Text:
    """UTF-8 text of `head` + the rest of `f`, decoded a block at a time, with the line count of what was dropped."""

    def __init__(self, inp: Input, f: BinaryIO, head: bytes):
        self.inp, self.f, self.next = inp, f, head
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.lines, self.col0, self.eof = "", 1, 0, False

    def more(self, keep_from: int) -> int:
        """Drop text before `keep_from`, append a block; returns the new position of `keep_from` (0), -1 at EOF."""
        if self.eof:
            return -1
        block, self.next = self.next, b""
        block = block or self.f.read(BLOCK)
        if b"\x00" in block:
            raise nul_error(self.inp)
        cut = self.text[:keep_from]
        newline = cut.rfind("\n")
        self.lines += cut.count("\n")
        self.col0 = len(cut) - newline - 1 if newline >= 0 else self.col0 + len(cut)
        try:
            piece = self.decoder.decode(block, final=not block)
        except UnicodeDecodeError:
            raise PreftuneError(f"{self.inp.name} is not valid UTF-8 (line {self.lines}); save it as UTF-8") from None
        self.eof = not block
        self.text = self.text[keep_from:] + piece
        return 0

    def where(self, pos: int) -> str:
        newline = self.text.rfind("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.col0 + pos + 1
        return f"line {self.lines + self.text.count(chr(10), 0, pos)} column {column}"


def json_array_chunks(inp: Input, f: BinaryIO, head: bytes, chunk_rows: int) -> Iterator[Rows]:
    """Elements of a JSON array file (`head` starts with its "["), parsed one at a time with the standard library's
    `raw_decode`, so the file is never held whole; an element over MAX_LINE_BYTES ends the file with one sentence.
    """
    src = _Text(inp, f, head)
    src.more(0)
    decode = json.JSONDecoder().raw_decode
    pos = _SPACE.match(src.text).end() + 1  # past the "["
    rows: Rows = []
    number, state = 0, "first"  # "first" (after "["), "value" (after ","), "next" (after a value)

    def fail(msg: str, at: int) -> PreftuneError:
        return PreftuneError(f"{inp.name} is not valid JSON ({msg} at {src.where(at)}); fix the file or write it "
                             "as JSON Lines, one object per line, so that bad rows can be skipped")

    while True:
        pos = _SPACE.match(src.text, pos).end()
        if pos == len(src.text):
            pos = src.more(pos)
            if pos < 0:
                raise fail("the array ends before its ']'", len(src.text))
            continue
        ch = src.text[pos]
        if state == "next":
            if ch not in ",]":
                raise fail("Expecting ',' delimiter", pos)
            pos, state = pos + 1, "value"
            if ch == "]":
                break
            continue
        if ch == "]" and state == "first":
            pos += 1
            break
        try:
            obj, end = decode(src.text, pos)
        except json.JSONDecodeError as e:
            # a value cut by the block's end fails at that end, or inside a string it opened
            cut = e.pos >= len(src.text) - 6 or e.msg.startswith("Unterminated string")
            if not cut or src.eof:
                raise fail(e.msg, e.pos) from None
            if len(src.text) - pos > MAX_LINE_BYTES:
                raise PreftuneError(f"{inp.name} element {number + 1} is longer than {MAX_LINE_BYTES:,} bytes; "
                                    "write the data as JSON Lines, one object per line") from None
            pos = src.more(pos)
            continue
        except RecursionError:
            raise PreftuneError(f"{inp.name} is not valid JSON (nested too deeply)") from None
        if end == len(src.text) and not src.eof:  # a number may go on in the next block
            pos = src.more(pos)
            continue
        number += 1
        piece = src.text[pos:end]
        one = too_long_row(len(piece)) if len(piece) > MAX_ROW_CHARS else row(obj, "\\u" in piece and bool(
            SURROGATE_ESCAPE.search(piece)))
        rows.append((number, one))
        pos, state = end, "next"
        if len(rows) >= chunk_rows:
            yield rows
            rows = []
    while True:  # only whitespace may follow the array
        pos = _SPACE.match(src.text, pos).end()
        if pos < len(src.text):
            raise fail("Extra data", pos)
        pos = src.more(pos)
        if pos < 0:
            break
    if not number:
        raise PreftuneError(f"data file {inp.name} is empty (an empty JSON array)")
    if rows:
        yield rows
