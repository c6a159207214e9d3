"""Tokenized data kept on disk (preftune.data.splits / cache / store): reused when nothing that shapes the ids
changed, rebuilt when anything did; the stored pairs are the per-pair rule's; the streamed held-out split is
the hold-out of the whole record list; a fresh run's entry is staged outside the (not yet existing) run folder and moved in."""

from __future__ import annotations

import json

import numpy as np
import pytest

import preftune.data.splits as splits
from preftune.config import TrainConfig
from preftune.data.cache import commit
from preftune.data.encode import tokenize_records
from preftune.data.examples import render_record
from preftune.data.holdout import held_out, prompt_ranks
from preftune.data.load import load_records
from preftune.data.splits import DataSettings, keep_data_in, load_splits
from preftune.data.store import largest_id

from .files import write_jsonl
from .test_render import tiny_tokenizer

ROWS = [{"prompt": f"what color {'is the sky ' * (i % 3)}", "chosen": " blue", "rejected": " green"} for i in range(6)]
ROWS += [{"prompt": "hello there", "chosen": " the sky is blue", "rejected": " the sky is green"}] * 2
ROWS += [{"prompt": f"hello {'there ' * i}", "chosen": " blue", "rejected": " the sky"} for i in range(1, 5)]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 records: detection votes on 3 rows (it otherwise reads up to 1,000 before the first chunk),
    then the reader hands on 3 rows at a time."""
    import preftune.data.detect as detect
    import preftune.data.load as load
    import preftune.data.validate as validate

    monkeypatch.setattr(load, "CHUNK_ROWS", 3)
    monkeypatch.setattr(detect, "VOTERS", 3)
    monkeypatch.setattr(validate, "VOTERS", 3)


def _cfg(path, **kw) -> DataSettings:
    return DataSettings.of(TrainConfig(model="m", data=str(path), output_dir="unused", progress=False, **kw))


@pytest.fixture
def builds(monkeypatch):
    """Counts cache entries built (as opposed to opened)."""
    count = {"n": 0}
    real = splits.build_entry

    def counted(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(splits, "build_entry", counted)
    return count


def test_reused_unless_something_that_shapes_the_ids_changes(tmp_path, builds):
    """One build, then reuse for the same settings and for settings the ids do not depend on (learning rate, batch
    size); a new entry for each key ingredient: an edited data file, a changed tokenizer (a chat template, an added
    token), max lengths, a prompt template, the hold-out seed."""
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = tmp_path / "cache"
    cache.mkdir()
    tok = tiny_tokenizer()
    first, _ = load_splits(_cfg(path), tok, "dpo", cache_dir=cache)
    load_splits(_cfg(path, learning_rate=1e-3, batch_size=2), tok, "dpo", cache_dir=cache)
    assert builds["n"] == 1 and len(list(cache.iterdir())) == 1

    changes = [
        lambda: (write_jsonl(tmp_path / "d.jsonl", ROWS[:-1] + [{**ROWS[-1], "chosen": " red"}]), _cfg(path), tok)[1:],
        lambda: (_cfg(path), tiny_tokenizer(template="{{ messages }}")),
        lambda: (_cfg(path), _with_token(tok)),
        lambda: (_cfg(path, max_length=5, max_prompt_length=2), tok),
        lambda: (_cfg(path, max_prompt_length=3), tok),
        lambda: (_cfg(path, prompt_template="{prompt}!"), tok),
        lambda: (_cfg(path, eval_fraction=0.25, seed=1), tok),
        lambda: (_cfg(path, eval_fraction=0.25, seed=2), tok),
    ]
    for n, change in enumerate(changes, start=2):
        cfg, t = change()
        load_splits(cfg, t, "dpo", cache_dir=cache)
        assert builds["n"] == n, n
        load_splits(cfg, t, "dpo", cache_dir=cache)  # and that one is reused in turn
        assert builds["n"] == n, n
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == len(changes) + 1


def _with_token(tok):
    import copy

    t = copy.deepcopy(tok)
    t.add_tokens(["sky is"])
    return t


def test_stored_pairs_are_the_per_pair_rule(tmp_path, small_chunks, monkeypatch):
    """Chunks of 3 records through the store give, pair by pair, exactly tokenize_records' ids and record indices
    (max_length 5 / max_prompt_length 2 truncate and drop some), reopened from the cache too."""
    import preftune.data.encode as encode

    sizes = []
    real = encode.BatchEncoder.__call__
    monkeypatch.setattr(encode.BatchEncoder, "__call__", lambda self, texts: sizes.append(len(texts)) or real(self, texts))
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    tok = tiny_tokenizer()
    cfg = _cfg(path, max_length=5, max_prompt_length=2)
    records = load_records(path).records
    want, stats = tokenize_records(tok, [render_record(tok, r) for r in records], max_length=5, max_prompt_length=2)
    assert stats.dropped_identical  # the hello-there pairs become identical: the check below covers dropping
    sizes.clear()  # tokenize_records above used the encoder too
    (tmp_path / "c").mkdir()
    for _ in range(2):  # built, then opened
        train, held = load_splits(cfg, tok, "dpo", cache_dir=tmp_path / "c")
        assert held is None and list(train.pairs) == want
        assert train.pairs.index.tolist() == [p.index for p in want]
        assert train.pairs.padded_lengths.tolist() == [p.padded_length for p in want]
        # the largest id, kept in the store's meta at write time (the vocabulary check reads no ids)
        assert largest_id(train.pairs) == max(max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in want)
    assert sizes == [3, 3, 3, 3]  # built once, in chunks of 3 (12 rows)


def test_streamed_held_out_split_is_the_whole_lists(tmp_path, small_chunks):
    """Streaming in chunks of 3 holds out by each record's prompt rank exactly what the hold-out of the whole
    record list does (record order kept on both sides), and the summary says how many records were held out."""
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    tok = tiny_tokenizer()
    records = load_records(path).records
    for seed in (0, 1, 5):
        train, held = load_splits(_cfg(path, eval_fraction=0.3, seed=seed), tok, "dpo")
        mask = held_out(np.frombuffer(prompt_ranks(records, seed), dtype="S32"), 0.3)
        want_train = [r for r, m in zip(records, mask) if not m]
        want_held = [r for r, m in zip(records, mask) if m]
        assert [records[i] for i in train.pairs.index.tolist()] == want_train
        assert [records[i] for i in held.pairs.index.tolist()] == want_held
        assert f"held out {len(want_held)} of {len(records)} for evaluation" in train.summary
        assert held.summary.startswith("eval tokenized: ")


def test_fresh_run_is_staged_then_moved_into_the_run_folder(tmp_path, monkeypatch):
    """The run folder does not exist yet: the entry is built under TMPDIR, nothing is written where the run folder
    will be, and keep_data_in moves it there; the pairs stay readable; the staging folder is gone."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run = tmp_path / "run"
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, _ = load_splits(_cfg(path), tiny_tokenizer(), "dpo", cache_dir=run / "data_cache")
    assert not run.exists() and len(list((tmp_path / "tmp").iterdir())) == 1
    before = list(train.pairs)
    keep_data_in(train, run / "data_cache")
    entries = list((run / "data_cache").iterdir())
    assert [e.name for e in entries] == [train.entry.key] and (entries[0] / "meta.json").is_file()
    assert list(train.pairs) == before and not list((tmp_path / "tmp").iterdir())


def test_shared_cache_dir_serves_every_run(tmp_path, builds):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    shared = tmp_path / "shared"
    for run in ("a", "b"):
        load_splits(_cfg(path, data_cache_dir=str(shared)), tiny_tokenizer(), "dpo", cache_dir=tmp_path / run)
    assert builds["n"] == 1 and not (tmp_path / "a").exists()
    meta = json.loads(next(shared.glob("*/meta.json")).read_text())
    assert meta["info"]["records"] == len(ROWS) and meta["ingredients"]["max_length"] == 1024


def test_two_processes_committing_one_key_keep_one_entry(tmp_path):
    """Both built the same entry; the second rename finds the first in place and drops its own copy."""
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(name)
    cache = tmp_path / "cache"
    assert commit(tmp_path / "one", cache, "k") == commit(tmp_path / "two", cache, "k") == cache / "k"
    assert (cache / "k" / "meta.json").read_text() == "one" and sorted(p.name for p in cache.iterdir()) == ["k"]


def test_sft_split_and_store_layout(tmp_path):
    """SFT pairs have one answer: rejected_ids is None and the store is [n, 2] lengths."""
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "what color", "completion": " blue"}])
    train, _ = load_splits(_cfg(path), tiny_tokenizer(None), "sft")
    (pair,) = list(train.pairs)
    assert pair.rejected_ids is None and train.pairs.lengths.shape == (1, 2)
    assert np.array_equal(train.pairs.padded_lengths, [len(pair.prompt_ids) + len(pair.chosen_ids)])


def test_a_tokenizing_failure_in_a_later_chunk_reaches_the_caller(tmp_path, small_chunks, monkeypatch):
    """Chunks are tokenized in a worker thread while the next is read: an error there (here in the second of
    four 3-record chunks) is raised by load_splits itself, and no partial entry is left in the cache."""
    import preftune.data.encode as encode

    calls = []
    real = encode.BatchEncoder.__call__

    def failing(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("tokenizer broke")
        return real(self, texts)

    monkeypatch.setattr(encode.BatchEncoder, "__call__", failing)
    (tmp_path / "c").mkdir()
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        load_splits(_cfg(write_jsonl(tmp_path / "d.jsonl", ROWS)), tiny_tokenizer(), "dpo", cache_dir=tmp_path / "c")
    # the third chunk was already handed to the worker when the second's result was collected
    assert calls == [3, 3, 3] and list((tmp_path / "c").iterdir()) == []


def _entry(cache) -> object:
    return next(p for p in cache.iterdir() if not p.name.startswith("."))


def test_a_damaged_entry_is_built_again_and_dead_stagings_are_swept(tmp_path, builds, capsys, monkeypatch):
    """An entry is checked against its files.json every time it is opened: an ids.bin with one token changed (the
    size kept), cut in half, or a lengths.bin gone are each said in one line and tokenized again, giving the
    intact entry's pairs; staging folders of a dead process (in the cache and the temporary folder) go first."""
    import os
    import subprocess

    from preftune.data.cache import _HOST as host

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path, cache = write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "cache"
    cache.mkdir()
    train, _ = load_splits(_cfg(path), tiny_tokenizer(), "dpo", cache_dir=cache)
    want = list(train.pairs)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [cache / f".tmp-{'0' * 24}-{host}-{dead.pid}", tmp_path / "tmp" / f"preftune-data-00-{host}-{dead.pid}-x"]
    for damage in ("edit", "cut", "missing"):
        ids = _entry(cache) / "data" / "ids.bin"
        raw = bytearray(ids.read_bytes())
        if damage == "edit":
            raw[0] ^= 1
            ids.write_bytes(raw)
        elif damage == "cut":
            ids.write_bytes(raw[: len(raw) // 2])
        else:
            (ids.parent / "lengths.bin").unlink()
        for p in stale:
            p.mkdir()
        train, _ = load_splits(_cfg(path), tiny_tokenizer(), "dpo", cache_dir=cache)
        said = capsys.readouterr().out
        assert "is unusable (data/" in said and "tokenizing the data again" in said, said
        assert list(train.pairs) == want and not any(p.exists() for p in stale)
    assert builds["n"] == 4 and sorted(p.name for p in cache.iterdir()) == [_entry(cache).name]
    assert os.listdir(tmp_path / "tmp") == []


def test_an_id_beyond_the_stores_largest_is_refused_when_read(tmp_path):
    """A pair's ids are checked against the largest id the store was written with (known from writing, so no page
    of ids.bin is read up front): an ids.bin changed behind the cache's back fails in one sentence, not in the
    embedding (an IndexError, or a device assert on a GPU)."""
    from preftune.errors import PreftuneError

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "cache").mkdir()
    train, _ = load_splits(_cfg(path), tiny_tokenizer(), "dpo", cache_dir=tmp_path / "cache")
    ids = train.pairs.store.ids
    top = train.pairs.store.largest_id
    np.memmap(ids.filename, dtype=ids.dtype, mode="r+")[3] = top + 1
    reopened, _ = load_splits(_cfg(path), tiny_tokenizer(), "dpo", cache_dir=None)  # (a fresh store, same rows)
    assert max(max(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in reopened.pairs) == top
    with pytest.raises(PreftuneError, match=f"holds token id {top + 1:,}, above the largest it was written with"):
        list(train.pairs)


def test_cache_folder_and_full_disk_are_one_sentence(tmp_path, monkeypatch):
    """A data_cache_dir that is a file, or inside one; a disk that fills while the entry is written: one
    sentence each, and no staging folder left."""
    import errno

    from preftune.errors import PreftuneError

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "afile").write_text("x")
    for where in ("afile", "afile/sub"):
        with pytest.raises(PreftuneError, match="is a file"):
            load_splits(_cfg(path, data_cache_dir=str(tmp_path / where)), tiny_tokenizer(), "dpo")

    def full(cfg, tokenizer, task, folder, *a):
        (folder / "ids.bin").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(splits, "build_entry", full)
    with pytest.raises(PreftuneError, match=r"^the disk filled while writing the tokenized data in .*cache \("
                                            r"[\d.]+ MiB free\); nothing else was changed"):
        load_splits(_cfg(path, data_cache_dir=str(tmp_path / "cache")), tiny_tokenizer(), "dpo")
    assert list((tmp_path / "cache").iterdir()) == []
