"""Row checks (preftune.data.validate): field paths, every reason with its line, messages, formats."""

from __future__ import annotations

import json

import pytest

from preftune.data.load import load_records
from preftune.errors import PreftuneError

from .files import PAIRS, write_jsonl


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
        json.dumps({"prompt": "a", "chosen": "  ", "rejected": "c"}),  # 7 empty: dropped and counted, not invalid
        json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}),  # 8 identical: dropped and counted
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
        # 44 characters before the value + 1,000,001 + '"}'
        "line 9: row longer than 1,000,000 characters (1,000,047)",
        "line 10: invalid UTF-8",
        "line 11: field 'prompt' is null, expected a string",
    ]
    for text in expected:
        assert f"  {path} {text}\n" in msg
    assert msg.startswith("7 of 11 data rows are invalid: ")
    assert msg.endswith("fix these rows or pass --skip-invalid to drop them")

    data = load_records(path, skip_invalid=True)
    assert data.records == [PAIRS[0], PAIRS[1]]
    assert [(x.row, x.reason) for x in data.skipped] == [(7, "empty answer"), (8, "identical answers")]
    assert [(x.row, x.category) for x in data.invalid][:3] == [
        (3, "not valid JSON"),
        (4, "not an object"),
        (5, "missing field 'chosen'"),
    ]
    assert [str(x) for x in data.invalid] == [f"{path} {t}" for t in expected]


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
    assert "line 2:" not in msg  # an empty answer is dropped and counted, not invalid
    assert "line 3: field 'chosen' message 1 content is int, expected a string" in msg
