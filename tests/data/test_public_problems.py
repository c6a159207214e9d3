"""What real public files do to a run (issue 25): a whitespace-only answer in Anthropic's HH test file, prompts glued
to their answers (an imdb DPO sample), UltraFeedback-binarized saved with train_prefs/test_prefs splits, answers the
tokenizer cannot tell apart, and `generate --prompt-field input.messages`."""

from __future__ import annotations

import pytest

from preftune.config import TrainConfig
from preftune.data.encode import tokenize_records
from preftune.data.examples import examples_from_records
from preftune.data.load import load_records
from preftune.data.prompts import read_prompts
from preftune.data.splits import DataSettings, load_splits
from preftune.errors import PreftuneError

from .files import write_jsonl
from .test_render import tiny_tokenizer

HH = "\n\nHuman: {q}\n\nAssistant:"


def test_whitespace_only_answer_is_dropped_and_counted_not_refused(tmp_path):
    """HH-RLHF's test split has a row whose rejected reply is whitespace: train drops that pair and says where
    (before: the whole file was refused until --skip-invalid); a structural error still stops the run."""
    rows = [{"chosen": HH.format(q="2+2?") + " 4", "rejected": HH.format(q="2+2?") + " 5"},
            {"chosen": HH.format(q="hi") + " Hello!", "rejected": HH.format(q="hi") + " \n "},
            {"chosen": HH.format(q="x") + " same", "rejected": HH.format(q="x") + " same"}]
    path = write_jsonl(tmp_path / "hh_test.jsonl", rows)
    data = load_records(path)
    assert data.records == [{"prompt": HH.format(q="2+2?"), "chosen": " 4", "rejected": " 5"}]
    assert data.summary().endswith(f"; dropped 2 pairs with nothing to train on: 1 empty answer, 1 identical answers "
                                   f"(first: {path} line 2: empty answer)")
    write_jsonl(tmp_path / "broken.jsonl", rows + [{"chosen": 3, "rejected": "x"}])
    with pytest.raises(PreftuneError, match="line 4: field 'chosen' is int, expected a string"):
        load_records(tmp_path / "broken.jsonl")
    write_jsonl(tmp_path / "none.jsonl", rows[1:])
    with pytest.raises(PreftuneError, match="has no pair to train on: all 2 rows hold an empty answer, identical "
                                            "answers or a tie"):
        load_records(tmp_path / "none.jsonl")


def test_glued_prompt_and_answer_warn_with_a_count(tmp_path):
    """"...joke of" + "the situation": 2 of 3 pairs run a word into the next (a space ends the third prompt)."""
    rows = [{"prompt": "The movie made a joke of", "chosen": "the situation", "rejected": "nothing at all"},
            {"prompt": "Rating: 9", "chosen": "0%", "rejected": " bad"},
            {"prompt": "Review: ", "chosen": "good", "rejected": "bad"}]
    data = load_records(write_jsonl(tmp_path / "imdb.jsonl", rows))
    (line,) = data.warnings()
    assert line.startswith(f"2 of 3 pairs run the prompt's last word into the answer's first with no space between "
                           f"({tmp_path / 'imdb.jsonl'} line 1: ...'movie made a joke of' + 'the situation'...)")


def _ultrafeedback(folder):
    import datasets

    def rows(n, tag):
        q = "what color is the sky"  # words of the tiny tokenizer's vocabulary
        return [{"prompt": q, "prompt_id": f"{tag}{i}", "score_chosen": 8.0, "score_rejected": 3.0,
                 "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "blue"}],
                 "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "green"}]}
                for i in range(n)]

    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows(3, "tr")),
                          "test_prefs": datasets.Dataset.from_list(rows(2, "te"))}).save_to_disk(str(folder))
    return folder


def test_split_and_eval_split_of_a_saved_dataset_dict(tmp_path):
    """UltraFeedback-binarized's splits are train_prefs/test_prefs: without --split the error lists them; --split
    and --eval-split pick the training and the held-out split of the same folder."""
    folder = _ultrafeedback(tmp_path / "uf")
    with pytest.raises(PreftuneError, match="has the splits train_prefs, test_prefs and none is called 'train'; "
                                            "pick the training split with --split NAME"):
        load_records(folder)
    assert len(load_records(folder, split="test_prefs").records) == 2
    with pytest.raises(PreftuneError, match="has no split 'test'; its splits are train_prefs, test_prefs"):
        load_records(folder, split="test")
    with pytest.raises(PreftuneError, match="--split train_prefs names a split of a saved dataset folder or a hub "
                                            "dataset; .* is a file"):
        load_records(write_jsonl(tmp_path / "f.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]),
                     split="train_prefs")
    cfg = TrainConfig(model="m", data=str(folder), output_dir="unused", split="train_prefs", eval_split="test_prefs",
                      progress=False, max_length=64, max_prompt_length=32)
    train, held = load_splits(DataSettings.of(cfg), tiny_tokenizer(), "dpo")
    assert (len(train.pairs), len(held.pairs)) == (3, 2)
    with pytest.raises(PreftuneError, match="eval_split and eval_fraction both choose the eval data"):
        TrainConfig(model="m", data="d", output_dir="o", eval_split="test_prefs", eval_fraction=0.1)


def test_hub_dataset_split_is_passed_on(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or
                        datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    assert load_records("someone/prefs", split="train_prefs").records[0]["chosen"] == "a"
    assert calls == [("someone/prefs", "train_prefs")]


def test_identical_ids_from_unknown_tokens_say_so():
    """The word-level vocabulary has no "cat"/"dog": both answers become <unk> </s>, identical ids. The reason names
    the unknown token instead of advising a longer max_length; a pair cut to the same ids is "after truncation"."""
    tok = tiny_tokenizer()
    texts = [("what color is the sky", " cat", " dog"), ("the sky is", " blue green", " blue sky")]
    _, stats = tokenize_records(tok, texts, max_length=4, max_prompt_length=3)
    assert stats.identical_causes() == {"truncation": 1, "unknown": 1, "normalisation": 0}
    assert ("1 dropped (chosen and rejected become the same tokens: the tokenizer has no token for the characters "
            "where they differ and maps them to its unknown token; use a tokenizer that covers the text)"
            in stats.summary())
    (ex,) = examples_from_records([{"prompt": t[0], "chosen": t[1], "rejected": t[2]} for t in texts[:1]],
                                  ["line 1"], 1, tokenizer=tok, max_length=64, max_prompt_length=32)
    assert "unknown token" in ex["tokens"]["dropped"]


def test_generate_prompt_field_is_a_path(tmp_path):
    """OpenAI preference rows keep the prompt under input.messages: `generate --data F --prompt-field input.messages`
    reads it as train does; a prompt line over 1,000,000 characters is one sentence, not a 100 MB generation."""
    msgs = [{"role": "user", "content": "2+2?"}]
    write_jsonl(tmp_path / "p.jsonl", [{"input": {"messages": msgs}, "preferred_output": []}])
    assert read_prompts(tmp_path / "p.jsonl", "input.messages") == [msgs]
    (tmp_path / "big.txt").write_text("ok\n" + "x" * 1_000_001 + "\n")
    with pytest.raises(PreftuneError, match="line 2 is longer than 1,000,000 characters"):
        read_prompts(tmp_path / "big.txt")
