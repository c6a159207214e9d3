"""The public entry points (preftune.data.load): load_records and its summary, SFT records."""

from __future__ import annotations

import pytest

from preftune.data.load import InvalidRow, LoadedData, load_records
from preftune.errors import PreftuneError

from .files import PAIRS, write_jsonl


def test_jsonl_standard(tmp_path):
    data = load_records(write_jsonl(tmp_path / "d.jsonl", PAIRS))
    assert isinstance(data, LoadedData)
    assert data.records == PAIRS
    assert data.format == "standard" and not data.conversational
    assert data.invalid == []
    assert data.summary() == f"loaded 3 pairs (standard) from {tmp_path / 'd.jsonl'}"


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


def test_error_lists_at_most_ten_rows(tmp_path):
    rows = [{"prompt": "p", "chosen": "c"}] * 25 + PAIRS
    with pytest.raises(PreftuneError) as e:
        load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    msg = str(e.value)
    assert msg.startswith("25 of 28 data rows are invalid: 25 missing field 'rejected'\n")
    assert msg.count("missing field 'rejected'") == 11  # the count line + 10 listed rows
    assert "  ... and 15 more\n" in msg


def test_invalid_row_str():
    assert (
        str(InvalidRow("data/train.jsonl", 7, "missing field 'chosen'"))
        == "data/train.jsonl line 7: missing field 'chosen'"
    )


