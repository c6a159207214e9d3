"""Prompts from any file preftune reads: a prompt field, chat messages, the prompts of pairs (repeats used once),
layouts only the data loader knows (ShareGPT, Alpaca), a .txt file; each with the line it came from."""

from __future__ import annotations

import json

import pytest

from preftune.errors import PreftuneError
from preftune.onpolicy.prompts import load_prompts


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompt_field_messages_and_pairs(tmp_path):
    got = load_prompts(_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}]))
    assert [(p.index, p.value, p.where) for p in got.prompts] == [
        (0, "a", f"{tmp_path / 'p.jsonl'} line 1"), (1, [{"role": "user", "content": "b"}], f"{tmp_path / 'p.jsonl'} line 2")]
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q1", "chosen": "x", "rejected": "y"},
                                               {"prompt": "q2", "chosen": "x", "rejected": "y"},
                                               {"prompt": "q1", "chosen": "z", "rejected": "y"}])
    got = load_prompts(pairs)
    assert [p.value for p in got.prompts] == ["q1", "q2"] and got.repeated == 1
    assert got.prompts[1].where.endswith("pairs.jsonl line 2")
    chat = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "answer"}]},
            {"messages": [{"role": "user", "content": "only a question"}]}]
    got = load_prompts(_jsonl(tmp_path / "chat.jsonl", chat))
    assert got.how == "chat messages"
    assert [p.value for p in got.prompts] == [chat[0]["messages"][:2], chat[1]["messages"]]
    nested = _jsonl(tmp_path / "n.jsonl", [{"meta": {"q": "deep"}}])
    assert load_prompts(nested, prompt_field="meta.q").prompts[0].value == "deep"


def test_layouts_the_loader_reads_and_text_files(tmp_path):
    sharegpt = [{"conversations": [{"from": "human", "value": "hi there"}], "chosen": {"from": "gpt", "value": "a"},
                 "rejected": {"from": "gpt", "value": "b"}}]
    got = load_prompts(_jsonl(tmp_path / "s.jsonl", sharegpt))
    assert got.how == "records" and got.prompts[0].value == [{"role": "user", "content": "hi there"}]
    alpaca = [{"instruction": "Add.", "input": "2+2", "output": "4"}]
    assert load_prompts(_jsonl(tmp_path / "a.jsonl", alpaca)).prompts[0].value == "Add.\n2+2"
    (tmp_path / "p.txt").write_text("one\n\ntwo\none\n")
    got = load_prompts(tmp_path / "p.txt")
    assert [p.value for p in got.prompts] == ["one", "two"] and got.prompts[1].where.endswith("p.txt line 3")


def test_bad_prompt_files_are_one_sentence(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PreftuneError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PreftuneError, match="is empty"):
        load_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(PreftuneError, match="line 2: field 'prompt' is empty"):
        load_prompts(_jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}, {"prompt": "  "}]))
    with pytest.raises(PreftuneError, match="no 'question' field .* pass --prompt-field NAME"):
        load_prompts(_jsonl(tmp_path / "q.jsonl", [{"text": "a"}]), prompt_field="question")
    with pytest.raises(PreftuneError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
