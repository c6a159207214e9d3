"""Input bounded while it is read (issue 26): an endless line (a gzip bomb), a huge JSON array element, a CSV line
without end, and chat templates that loop or balloon: each is one sentence, long before memory or time runs out.
The limits are made small here so that the cases stay quick; BENCHMARKS.md has the real-size figures."""

from __future__ import annotations

import gzip
import json
import time

import pytest

import preftune.data.chat_template as chat_template
import preftune.data.json_arrays as json_arrays
import preftune.data.readers as readers
from preftune.data.load import load_records
from preftune.data.render import render_texts
from preftune.data.rows import Input
from preftune.errors import PreftuneError

from .test_render import conv, tiny_tokenizer


class Endless:
    """A file of b"x" without end, counting the bytes it handed out."""

    def __init__(self) -> None:
        self.served = 0

    def read(self, n: int = -1) -> bytes:
        self.served += n
        return b"x" * n


def test_an_endless_line_stops_the_reading_at_the_bound(monkeypatch):
    """A stream that never ends: reading gives up once one line passes MAX_SKIP_BYTES (8 MB here), having read at
    most one block more, and never keeps more than MAX_LINE_BYTES of the line."""
    monkeypatch.setattr(readers, "MAX_SKIP_BYTES", 8 << 20)
    f = Endless()
    with pytest.raises(PreftuneError, match=r"^bomb line 1 runs over 8 MB without a line break"):
        list(readers.byte_lines(Input("bomb", None, "file"), f, b'{"prompt": "'))
    assert f.served <= (8 << 20) + readers.BLOCK


def _gzip(path, data: bytes):
    path.write_bytes(gzip.compress(data, compresslevel=1))
    return path


@pytest.mark.parametrize("name", ["bomb.jsonl.gz", "bomb.csv.gz"])
def test_a_gzip_bomb_of_one_line_is_one_sentence(tmp_path, monkeypatch, name):
    """24 MB of "x" gzipped to ~24 kB, one line: refused at the 8 MB bound, JSONL and CSV alike (before: the whole
    line was joined in memory, 6.7 GB RSS for a 2 MB bomb, and CSV was read whole)."""
    monkeypatch.setattr(readers, "MAX_SKIP_BYTES", 8 << 20)
    head = b"prompt,chosen,rejected\n" if name.endswith(".csv.gz") else b'{"prompt": "'
    path = _gzip(tmp_path / name, head + b"x" * (24 << 20))
    with pytest.raises(PreftuneError, match=f"line {2 if 'csv' in name else 1} runs over 8 MB without a line break"):
        load_records(path)


def test_an_over_long_line_costs_its_row_and_a_long_array_element_the_file(tmp_path, monkeypatch):
    """A JSONL line over MAX_LINE_BYTES (1,000 bytes here) is skipped as it is read: one invalid row, the next rows
    read. A JSON array is parsed an element at a time; an element growing past the bound (50,000 bytes here) while
    it is read is one sentence."""
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(readers, "BLOCK", 256)
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    (tmp_path / "d.jsonl").write_text(good + "\n" + json.dumps({"prompt": "x" * 5000}) + "\n" + good + "\n")
    data = load_records(tmp_path / "d.jsonl", skip_invalid=True)
    assert len(data.records) == 2
    assert data.invalid[0].reason == "row longer than 1,000,000 characters (5,014 bytes)"
    monkeypatch.setattr(json_arrays, "MAX_LINE_BYTES", 50_000)  # the first 64 kB are read at once to sniff the file
    monkeypatch.setattr(json_arrays, "BLOCK", 256)
    (tmp_path / "a.json").write_text(json.dumps([json.loads(good), {"prompt": "x" * 100_000}, json.loads(good)]))
    with pytest.raises(PreftuneError, match="a.json element 2 is longer than 50,000 bytes; write the data as JSON Lines"):
        load_records(tmp_path / "a.json")
    (tmp_path / "ok.json").write_text(json.dumps([json.loads(good)] * 40, indent=2))  # elements across blocks
    assert len(load_records(tmp_path / "ok.json").records) == 40


@pytest.mark.parametrize("template, says", [
    ("{{ 'x' * 300000000 }}", "repeats a value to 300,000,000 characters"),
    ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "builds a value of 67,108,864 characters"),
    ("{{ ('x' * 100000) | replace('x', 'y' * 1000) }}", "applies the replace filter"),
    ("{{ 'x' | center(300000000) }}", "passes the number 300,000,000 to a call"),
    ("{{ '{:>300000000}'.format(1) }}", "formats with a width of many millions of characters"),
    ("{{ lipsum(n=100000000) }}", "passes the number 100,000,000 to a call"),
], ids=["repeat", "doubling", "replace", "center", "format", "lipsum"])
def test_a_template_that_balloons_is_refused_before_it_allocates(template, says):
    """Each would build hundreds of MB to GBs (transformers renders the first at 1.2 GB RSS, then the tokenizer
    aborts the process): refused by the sandbox's checks, before or right after a bounded step."""
    with pytest.raises(PreftuneError, match=f"the chat template {says}.*on the row beginning 'hi'"):
        render_texts(tiny_tokenizer(template), conv("hi", "a", "b"))


def test_a_template_that_loops_is_stopped_by_the_time_limit(monkeypatch):
    """Two nested range(100000) loops (10^10 iterations, hours): stopped at the time limit (0.3 s here)."""
    monkeypatch.setattr(chat_template, "SECONDS", 0.3)
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(PreftuneError, match="the chat template ran for more than 0.3 s on one row"):
        render_texts(tiny_tokenizer(loops), conv("hi", "a", "b"))
    assert time.monotonic() - start < 10  # stopped, not run to the end (a bound, not a speed claim)
