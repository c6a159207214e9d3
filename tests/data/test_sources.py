"""Reading sources into rows (preftune.data.sources): file kinds, folders, globs, saved datasets, the hub,
file-level errors and the row numbers that messages cite."""

from __future__ import annotations

import gzip
import json

import pytest

from preftune.data.load import load_records
from preftune.errors import PreftuneError

from .files import PAIRS, write_csv, write_jsonl


def test_json_array_seed_style(tmp_path):
    """The seed file style: one JSON array of {"prompt", "chosen", "rejected"} objects, pretty-printed."""
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(PAIRS, indent=2))
    assert load_records(path).records == PAIRS


def test_json_array_reports_element_index(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([PAIRS[0], {"prompt": "p", "chosen": "c"}, "oops"]))
    with pytest.raises(PreftuneError) as e:
        load_records(path)
    assert f"{path} element 2: missing field 'rejected'" in str(e.value)
    assert f"{path} element 3: not an object (a JSON string)" in str(e.value)
    data = load_records(path, skip_invalid=True)
    assert data.origins == [f"{path} element 1"]


def test_broken_json_array_is_a_file_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"prompt": "p", "chosen": "c", "rejected": "r"},\n {"prompt": ]')
    with pytest.raises(PreftuneError, match=r"is not valid JSON \(Expecting value at line 2 column 13\)"):
        load_records(path)


def test_pretty_printed_object_with_data_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": PAIRS}, indent=2))
    assert load_records(path).records == PAIRS


def test_csv(tmp_path):
    assert load_records(write_csv(tmp_path / "d.csv", PAIRS)).records == PAIRS


def test_csv_conversational_cells_are_decoded(tmp_path):
    """A cell holding a JSON list of messages is decoded; a prompt that merely starts with '[' stays text."""
    rows = [
        {
            "prompt": json.dumps([{"role": "user", "content": "hi"}]),
            "chosen": json.dumps([{"role": "assistant", "content": "hello"}]),
            "rejected": json.dumps([{"role": "assistant", "content": "go"}]),
        }
    ]
    data = load_records(write_csv(tmp_path / "c.csv", rows))
    assert data.format == "conversational" and data.conversational
    assert data.records[0]["chosen"] == [{"role": "assistant", "content": "hello"}]
    plain = [{"prompt": "[1, 2] is a list?", "chosen": "yes", "rejected": "no"}]
    assert load_records(write_csv(tmp_path / "p.csv", plain)).records == plain


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), path)
    assert load_records(path).records == PAIRS


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in PAIRS).encode()))
    assert load_records(path).records == PAIRS


def test_list_of_files_and_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", PAIRS[:2])
    write_jsonl(tmp_path / "b.jsonl", PAIRS[2:])
    by_list = load_records([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    by_glob = load_records(str(tmp_path / "*.jsonl"))
    by_dir = load_records(tmp_path)
    for data in (by_list, by_glob, by_dir):
        assert data.records == PAIRS
        assert data.sources == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert by_glob.summary() == "loaded 3 pairs (standard) from 2 files"
    with pytest.raises(PreftuneError, match="no data files match"):
        load_records(str(tmp_path / "*.csv"))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds").records == PAIRS
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS[:2]), "test": datasets.Dataset.from_list(PAIRS[2:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd").records == PAIRS[:2]
    assert load_records(tmp_path / "dd", split="test").records == PAIRS[2:]
    with pytest.raises(PreftuneError, match="has no split 'validation'; its splits are train, test: pass one with --split"):
        load_records(tmp_path / "dd", split="validation")


def test_hub_name_unreachable(monkeypatch):
    """A non-path string like owner/name goes to the hub; a failure there is a PreftuneError."""
    import datasets

    calls = []

    def offline(name, split):
        calls.append((name, split))
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PreftuneError, match="data path someone/prefs does not exist, and the hub dataset"):
        load_records("someone/prefs")
    assert calls == [("someone/prefs", "train")]
    with pytest.raises(PreftuneError, match="data file data/train.jsonl does not exist"):
        load_records("data/train.jsonl")  # a file name, not a hub name: no hub call
    assert len(calls) == 1


def test_csv_line_numbers_count_the_header_and_multiline_cells(tmp_path):
    """Header = line 1. Row 1 spans lines 2-3 (a quoted newline), so row 2 starts on line 4 (an empty answer:
    dropped and counted, not invalid) and row 3 on line 5."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",a,b\nq,,b\nq2,x\n', encoding="utf-8")
    data = load_records(path, skip_invalid=True)
    assert data.records == [{"prompt": "two\nlines", "chosen": "a", "rejected": "b"}]
    assert [(x.row, x.reason) for x in data.skipped] == [(4, "empty answer")]
    assert [(x.row, x.reason) for x in data.invalid] == [(5, "has 2 fields, the header has 3")]


def test_file_level_errors(tmp_path):
    with pytest.raises(PreftuneError, match=r"^data file .*nope.jsonl does not exist$"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(PreftuneError, match="is empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    with pytest.raises(PreftuneError, match="does not look like a JSONL/JSON/CSV/Parquet data file"):
        load_records(tmp_path / "bin.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b"\xe9\xe8\xff\n\xfe\xfa\n")
    with pytest.raises(PreftuneError, match="2 of 2 lines are not valid UTF-8"):
        load_records(tmp_path / "latin.jsonl")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(PreftuneError, match="does not look like a JSONL/JSON/CSV/Parquet data file"):
        load_records(tmp_path / "fake.parquet")
    (tmp_path / "all_bad.jsonl").write_text("oops\n")
    with pytest.raises(PreftuneError, match="has no valid rows"):
        load_records(tmp_path / "all_bad.jsonl", skip_invalid=True)
    (tmp_path / "header.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(PreftuneError, match="has a header but no data rows"):
        load_records(tmp_path / "header.csv")
    with pytest.raises(PreftuneError, match="unknown data kind"):
        load_records(tmp_path / "header.csv", kind="rm")
