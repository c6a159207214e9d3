"""Loading and validating preference / SFT data (preftune.data.load)."""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import pytest

from preftune.data.load import InvalidRow, LoadedData, load_records, split_implicit_prompt, split_records
from preftune.errors import PreftuneError

PAIRS = [
    {"prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
]


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows one per line; raw_lines maps a 1-based line number to a literal line inserted there."""
    lines = [json.dumps(r) for r in rows]
    for number, text in sorted((raw_lines or {}).items()):
        lines.insert(number - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- formats


def test_jsonl_standard(tmp_path):
    data = load_records(write_jsonl(tmp_path / "d.jsonl", PAIRS))
    assert isinstance(data, LoadedData)
    assert data.records == PAIRS
    assert data.format == "standard" and not data.conversational
    assert data.invalid == []
    assert data.summary() == f"loaded 3 pairs (standard) from {tmp_path / 'd.jsonl'}"


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
    with pytest.raises(PreftuneError, match="has no split 'validation'; it has train, test"):
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


# -------------------------------------------------------------------------------------- field mapping


def test_field_mapping_with_dotted_path(tmp_path):
    rows = [{"meta": {"question": "Why?"}, "good": "Because.", "bad": "No."}]
    data = load_records(
        write_jsonl(tmp_path / "d.jsonl", rows),
        prompt_field="meta.question",
        chosen_field="good",
        rejected_field="bad",
    )
    assert data.records == [{"prompt": "Why?", "chosen": "Because.", "rejected": "No."}]
    with pytest.raises(PreftuneError, match=r"line 1: missing field 'meta.answer'"):
        load_records(
            tmp_path / "d.jsonl", prompt_field="meta.answer", chosen_field="good", rejected_field="bad"
        )


def test_literal_dotted_key_wins(tmp_path):
    rows = [{"meta.question": "flat", "meta": {"question": "nested"}, "chosen": "a", "rejected": "b"}]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows), prompt_field="meta.question")
    assert data.records[0]["prompt"] == "flat"


def test_wrong_field_names_explain_the_mapping(tmp_path):
    rows = [{"question": "q", "good": "a", "bad": "b"}] * 3
    with pytest.raises(PreftuneError) as e:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows), format="standard")
    # each row reports its first missing field (prompt is checked first)
    assert (
        "its rows have the fields question, good, bad, not 'prompt'; name yours with --prompt-field"
        in str(e.value)
    )


# ------------------------------------------------------------------------------------ implicit prompt


def test_implicit_prompt_backs_off_to_a_word_boundary():
    """ "The answer is blue" vs "The answer is black": the common prefix "The answer is bl" cuts a word;
    backing off to the space gives "The answer is " and the space moves to the completions."""
    c, r = "Q: sky?\nA: The answer is blue", "Q: sky?\nA: The answer is black"
    k = split_implicit_prompt(c, r)
    assert (c[:k], c[k:], r[k:]) == ("Q: sky?\nA: The answer is", " blue", " black")
    # a newline before the split stays with the prompt
    c, r = "Human: hi\nBot:\nHello", "Human: hi\nBot:\nGo"
    k = split_implicit_prompt(c, r)
    assert (c[:k], c[k:]) == ("Human: hi\nBot:\n", "Hello")


def test_implicit_format_jsonl(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: color of the sky?\n\nAssistant: Blue",
            "rejected": "\n\nHuman: color of the sky?\n\nAssistant: Bleu",
        },
        {"chosen": "Hi there", "rejected": "Bye now"},  # no shared word: no prompt
    ]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows), skip_invalid=True)
    assert data.format == "implicit"
    assert data.records == [
        {"prompt": "\n\nHuman: color of the sky?\n\nAssistant:", "chosen": " Blue", "rejected": " Bleu"}
    ]
    assert [str(x) for x in data.invalid] == [
        f"{tmp_path / 'd.jsonl'} line 2: chosen and rejected share no leading text, so there is no prompt"
    ]


def test_implicit_conversational(tmp_path):
    u1 = {"role": "user", "content": "hi"}
    a1 = {"role": "assistant", "content": "hello"}
    u2 = {"role": "user", "content": "sky?"}
    rows = [
        {
            "chosen": [u1, a1, u2, {"role": "assistant", "content": "blue"}],
            "rejected": [u1, a1, u2, {"role": "assistant", "content": "green"}],
        }
    ]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.format == "implicit" and data.conversational
    assert data.records == [
        {
            "prompt": [u1, a1, u2],
            "chosen": [{"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "assistant", "content": "green"}],
        }
    ]


def test_conversational_explicit_and_string_prompt(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "prompt": "sky?",
            "chosen": [{"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "assistant", "content": "red"}],
        },
    ]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.format == "conversational"
    assert data.records[1]["prompt"] == [{"role": "user", "content": "sky?"}]


# ------------------------------------------------------------------------------------------------ sft


def test_sft_prompt_completion(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    data = load_records(write_jsonl(tmp_path / "s.jsonl", rows), kind="sft")
    assert data.format == "sft" and data.records == rows
    assert data.summary().startswith("loaded 2 examples (sft)")


def test_sft_accepts_the_preference_format_setting(tmp_path):
    """One `format` setting serves train and sft: standard/conversational mean auto, implicit means
    preference-chosen with the shared beginning as the prompt."""
    rows = [{"prompt": "p1", "completion": "c1"}]
    assert (
        load_records(write_jsonl(tmp_path / "s.jsonl", rows), kind="sft", format="standard").format == "sft"
    )
    implicit = [{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: red"}]
    data = load_records(write_jsonl(tmp_path / "i.jsonl", implicit), kind="sft", format="implicit")
    assert data.format == "preference-chosen"
    assert data.records == [{"prompt": "Q: sky? A:", "completion": " blue"}]


def test_sft_from_preference_uses_chosen(tmp_path):
    data = load_records(write_jsonl(tmp_path / "p.jsonl", PAIRS), kind="sft")
    assert data.format == "preference-chosen"
    assert data.records == [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
    implicit = [{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: red"}]
    data = load_records(write_jsonl(tmp_path / "i.jsonl", implicit), kind="sft")
    assert data.records == [{"prompt": "Q: sky? A:", "completion": " blue"}]


# ---------------------------------------------------------------------------------------- validation


def test_every_reason_with_its_line_number(tmp_path):
    """Line numbers are 1-based and count blank lines; each bad row gets its own reason."""
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(PAIRS[0]),  # 1 ok
        "",  # 2 blank, skipped
        '{"prompt": "a", "chosen": "b" "rejected": "c"}',  # 3 not JSON
        "[1, 2]",  # 4 not an object
        json.dumps({"prompt": "a", "rejected": "c"}),  # 5 missing chosen
        json.dumps({"prompt": 7, "chosen": "b", "rejected": "c"}),  # 6 wrong type
        json.dumps({"prompt": "a", "chosen": "  ", "rejected": "c"}),  # 7 empty
        json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}),  # 8 identical
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "x" * 1_000_001}),  # 9 too long
        json.dumps({"prompt": None, "chosen": "b", "rejected": "c"}),  # 11 null (line 10 is the bad bytes)
        json.dumps(PAIRS[1]),  # 12 ok
    ]
    raw = "\n".join(lines[:9]).encode() + b'\n{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n'
    raw += "\n".join(lines[9:]).encode() + b"\n"
    path.write_bytes(raw)
    with pytest.raises(PreftuneError) as e:
        load_records(path)
    msg = str(e.value)
    expected = [
        "line 3: not valid JSON (Expecting ',' delimiter: column 31)",
        "line 4: not an object (a JSON list)",
        "line 5: missing field 'chosen'",
        "line 6: field 'prompt' is int, expected a string",
        "line 7: field 'chosen' is empty",
        "line 8: chosen is identical to rejected",
        # 44 characters before the value + 1,000,001 + '"}'
        "line 9: row longer than 1,000,000 characters (1,000,047)",
        "line 10: invalid UTF-8",
        "line 11: field 'prompt' is null, expected a string",
    ]
    for text in expected:
        assert f"  {path} {text}\n" in msg
    assert msg.startswith("9 of 11 data rows are invalid: ")
    assert msg.endswith("fix these rows or pass --skip-invalid to drop them")

    data = load_records(path, skip_invalid=True)
    assert data.records == [PAIRS[0], PAIRS[1]]
    assert [(x.row, x.category) for x in data.invalid][:3] == [
        (3, "not valid JSON"),
        (4, "not an object"),
        (5, "missing field 'chosen'"),
    ]
    assert [str(x) for x in data.invalid] == [f"{path} {t}" for t in expected]


def test_csv_line_numbers_count_the_header_and_multiline_cells(tmp_path):
    """Header = line 1. Row 1 spans lines 2-3 (a quoted newline), so row 2 starts on line 4."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"two\nlines",a,b\nq,,b\nq2,x\n', encoding="utf-8")
    data = load_records(path, skip_invalid=True)
    assert data.records == [{"prompt": "two\nlines", "chosen": "a", "rejected": "b"}]
    assert [(x.row, x.reason) for x in data.invalid] == [
        (4, "field 'chosen' is empty"),
        (5, "has 2 fields, the header has 3"),
    ]


def test_error_lists_at_most_ten_rows(tmp_path):
    rows = [{"prompt": "p", "chosen": "c"}] * 25 + PAIRS
    with pytest.raises(PreftuneError) as e:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    msg = str(e.value)
    assert msg.startswith("25 of 28 data rows are invalid: 25 missing field 'rejected'\n")
    assert msg.count("missing field 'rejected'") == 11  # the count line + 10 listed rows
    assert "  ... and 15 more\n" in msg


def test_mixed_formats_in_one_file_and_across_files(tmp_path):
    conv = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    with pytest.raises(PreftuneError, match="line 4: row is conversational .* mixed formats"):
        load_records(write_jsonl(tmp_path / "m.jsonl", [*PAIRS, conv]))
    write_jsonl(tmp_path / "c.jsonl", [conv])
    with pytest.raises(PreftuneError, match="the data files mix formats"):
        load_records([tmp_path / "m.jsonl", tmp_path / "c.jsonl"], skip_invalid=True)


def test_format_override(tmp_path):
    rows = [{"prompt": "ignored", "chosen": "Q: x? A: yes", "rejected": "Q: x? A: no"}]
    data = load_records(write_jsonl(tmp_path / "d.jsonl", rows), format="implicit")
    assert data.records == [{"prompt": "Q: x? A:", "chosen": " yes", "rejected": " no"}]
    with pytest.raises(PreftuneError, match="unknown data format 'chat'"):
        load_records(tmp_path / "d.jsonl", format="chat")


def test_conversational_message_errors(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": 3}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
    ]
    with pytest.raises(PreftuneError) as e:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    msg = str(e.value)
    assert "line 1: field 'prompt' message 1 has no 'content'" in msg
    assert "line 2: field 'chosen' is empty" in msg
    assert "line 3: field 'chosen' message 1 content is int, expected a string" in msg


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


def test_invalid_row_str():
    assert (
        str(InvalidRow("data/train.jsonl", 7, "missing field 'chosen'"))
        == "data/train.jsonl line 7: missing field 'chosen'"
    )


def test_100k_rows_load_fast(tmp_path):
    """The same loader runs before every training run; 100k rows must not cost more than a few seconds."""
    path = tmp_path / "big.jsonl"
    row = {
        "prompt": "Question number {} about something?",
        "chosen": "A helpful answer " * 8,
        "rejected": "Nope " * 8,
    }
    path.write_text("\n".join(json.dumps({**row, "prompt": row["prompt"].format(i)}) for i in range(100_000)))
    start = time.perf_counter()
    data = load_records(path)
    elapsed = time.perf_counter() - start
    assert len(data.records) == 100_000
    assert elapsed < 5.0, elapsed


# -------------------------------------------------------------------------------------------- splitting


def test_split_records_is_deterministic_and_groups_prompts():
    """40 records over 10 prompts (4 each); eval_fraction 0.2 -> 8 records = exactly 2 whole prompts."""
    records = [{"prompt": f"p{i % 10}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(40)]
    train, held = split_records(records, 0.2, seed=1)
    assert len(held) == 8 and len(train) == 32
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held})
    assert split_records(records, 0.2, seed=1) == (train, held)
    # order of the input does not change which prompts are held out
    _, held_rev = split_records(records[::-1], 0.2, seed=1)
    assert {r["prompt"] for r in held_rev} == {r["prompt"] for r in held}
    # another seed holds out other prompts (for these 10 prompts and seeds 1 and 2)
    _, held2 = split_records(records, 0.2, seed=2)
    assert {r["prompt"] for r in held2} != {r["prompt"] for r in held}
    assert split_records(records, 0.0) == (records, [])
    with pytest.raises(PreftuneError):
        split_records(records, 1.0)
    with pytest.raises(PreftuneError, match="share one prompt"):
        split_records([{"prompt": "same", "chosen": "a", "rejected": "b"}] * 5, 0.2)


def test_split_records_conversational_prompts():
    records = [
        {"prompt": [{"role": "user", "content": f"q{i % 3}"}], "chosen": [], "rejected": []} for i in range(9)
    ]
    train, held = split_records(records, 0.34, seed=0)
    assert len(held) == 3 and len(train) == 6
    assert {r["prompt"][0]["content"] for r in held}.isdisjoint({r["prompt"][0]["content"] for r in train})
