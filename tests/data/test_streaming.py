"""Reading in chunks (preftune.data.sources.iter_rows, preftune.data.load.RecordStream): the same rows, row numbers
and errors as reading whole, for files larger than memory; lone UTF-16 surrogates as one invalid row."""

from __future__ import annotations

import gzip
import json

import pytest

import preftune.data.readers as readers
from preftune.data.load import RecordStream, load_records
from preftune.data.sources import iter_rows, read_rows, resolve
from preftune.errors import PreftuneError

from .files import PAIRS, write_csv, write_jsonl


def _rows(path, chunk_rows):
    inp = resolve(str(path))[0]
    return [[(n, getattr(o, "reason", o)) for n, o in chunk] for chunk in iter_rows(inp, None, chunk_rows)]


def test_jsonl_chunks_keep_row_numbers_across_blocks(tmp_path, monkeypatch):
    """A 7-byte read block splits lines anywhere; blank line 3 is skipped and line 4 is not JSON: chunks of 2 rows
    hold lines (1, 2), (4, 5), (6) with their own numbers, exactly the rows read_rows gives in one piece."""
    monkeypatch.setattr(readers, "BLOCK", 7)
    lines = [json.dumps(PAIRS[0]), json.dumps(PAIRS[1]), "", "{oops", json.dumps(PAIRS[2]), json.dumps(PAIRS[0])]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    chunks = _rows(path, 2)
    assert [[n for n, _ in c] for c in chunks] == [[1, 2], [4, 5], [6]]
    assert chunks[1][0][1].startswith("not valid JSON")
    assert [r for c in chunks for r in c] == [(n, getattr(o, "reason", o)) for n, o in read_rows(resolve(str(path))[0])]


def test_gzip_and_parquet_stream_in_chunks(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(("\n".join(json.dumps(p) for p in PAIRS * 3)).encode()))
    assert [len(c) for c in _rows(gz, 4)] == [4, 4, 1]
    pq.write_table(pa.Table.from_pylist(PAIRS * 3), tmp_path / "d.parquet", row_group_size=2)
    chunks = _rows(tmp_path / "d.parquet", 4)
    assert [n for c in chunks for n, _ in c] == list(range(1, 10))
    assert load_records(tmp_path / "d.parquet").records == PAIRS * 3


def test_nul_bytes_after_the_first_block_still_refuse_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BLOCK", 16)
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(PAIRS[0]) + "\n").encode() * 20 + b"\x00\x00")
    with pytest.raises(PreftuneError, match="contains NUL bytes"):
        load_records(path)


def test_record_stream_counts_without_keeping_records(tmp_path):
    """Two files of 3 and 2 valid pairs (one invalid line in the second, skipped). Format detection reads up to
    1,000 rows of a file before anything is validated, so each small file comes as one chunk: they start at
    record 0 and 3. finish() gives the same summary as load_records, with the count instead of the records."""
    a = write_jsonl(tmp_path / "a.jsonl", PAIRS)
    b = write_jsonl(tmp_path / "b.jsonl", PAIRS[:2], raw_lines={2: "{broken"})
    stream = RecordStream([a, b], skip_invalid=True, chunk_rows=2)
    starts = [c.start for c in stream]
    assert starts == [0, 3] and stream.count == 5 and not stream.failed
    loaded = stream.finish()
    assert loaded.records == [] and loaded.summary() == load_records([a, b], skip_invalid=True).summary()
    assert loaded.summary().startswith("loaded 5 pairs (standard) from 2 files; dropped 1 invalid row")


def test_record_stream_knows_early_that_it_will_fail(tmp_path):
    """Without skip_invalid the first invalid row dooms the load: `failed` turns True while the rest is still read,
    so tokenization can stop; finish() then lists every invalid row as load_records does."""
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS * 2, raw_lines={2: "{broken", 5: "[]"})
    stream = RecordStream(path, chunk_rows=2)
    seen = [stream.failed for _ in stream]
    assert seen[0] is True  # the first chunk already holds the broken line 2
    with pytest.raises(PreftuneError, match="2 of 8 data rows are invalid"):
        stream.finish()


@pytest.mark.parametrize("writer", ["jsonl", "json", "csv"])
def test_lone_surrogate_is_one_invalid_row(tmp_path, writer):
    """'\\ud800' is half of a UTF-16 pair: json.loads gives a str that no UTF-8 encoder (the tokenizer's included)
    accepts, which issue 13 met as a traceback. Now it is one invalid row named by file and line; a proper pair
    (\\ud83d\\ude00, one emoji) still reads."""
    bad = {"prompt": "p", "chosen": [{"role": "assistant", "content": "x\ud800"}], "rejected": "r"}
    emoji = {"prompt": "smile \U0001f600", "chosen": "b", "rejected": "c"}  # json.dumps writes \ud83d\ude00
    if writer == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", [PAIRS[0], {**PAIRS[1], "prompt": "p\ud800"}, emoji])
        where, field = "line 2", "prompt"
    elif writer == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([PAIRS[0], {**PAIRS[1], "rejected": "\udfff"}, emoji]))
        where, field = "element 2", "rejected"
    else:
        rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in (PAIRS[0], bad, emoji)]
        path = write_csv(tmp_path / "d.csv", rows)
        where, field = "line 3", "chosen.0.content"
    assert "\\ud" in path.read_text()  # the file holds the escape, not the character
    with pytest.raises(PreftuneError) as e:
        load_records(path)
    assert f"{path} {where}: field '{field}' holds a lone UTF-16 surrogate" in str(e.value)
    data = load_records(path, skip_invalid=True)
    assert [r["prompt"] for r in data.records] == [PAIRS[0]["prompt"], "smile \U0001f600"]
