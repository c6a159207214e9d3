"""One data source, streamed through validation, rendering and batched tokenization into a `PairStore` folder.

Nothing holds all records at once: each chunk of records (`RecordStream`) is rendered, tokenized
(`BatchEncoder`) and appended to the store's files, and only small per-record arrays stay in memory (what
tokenization did to each record, a hash for exact duplicates, the hold-out rank of its prompt), plus the
first few records for the summary's example. Once validation knows the load will fail (an invalid row without
skip_invalid, mixed formats), tokenization stops and the rest is only validated, so the error comes as fast
as reading allows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from preftune.data.chat_template import render_guard
from preftune.data.encode import BatchEncoder
from preftune.data.examples import render_record
from preftune.data.holdout import prompt_ranks
from preftune.data.load import LoadedData, RecordStream
from preftune.data.stats import value_key
from preftune.data.store import StoreWriter

SAMPLES = 64  # first kept records kept whole, for the example the summary shows


@dataclass
class Built:
    """A tokenized source: its `LoadedData` (counts, no records), the store's meta, and per valid record: its
    store position (-1: dropped by tokenization), tokenization flags and EOS counts
    (`preftune.data.encode.EncodedChunk`), a digest for exact duplicates and, when asked, its prompt's
    hold-out rank."""

    loaded: LoadedData
    store: dict
    position: np.ndarray
    flags: np.ndarray
    eos: np.ndarray
    duplicate_key: np.ndarray
    rank: np.ndarray | None
    samples: dict[int, tuple[dict, tuple[str, ...], str]] = field(default_factory=dict)


def _digest(record: dict, parts: tuple[str, ...]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = value_key(record[part]).encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def build_source(source: Any, folder: Path, *, tokenizer: Any, encoder: BatchEncoder, load_kwargs: dict,
                 rank_seed: int | None = None, progress: bool = False, desc: str = "tokenizing") -> Built:
    """Validate and tokenize `source` into a store in `folder`; raises what `load_records` raises."""
    stream = RecordStream(source, **load_kwargs)
    writer: StoreWriter | None = None
    position, flags, eos, dup, ranks = [], [], [], bytearray(), bytearray()
    samples: dict[int, tuple[dict, tuple[str, ...], str]] = {}

    def store(chunk: Any, texts: list[tuple[str, ...]], enc: Any) -> None:
        nonlocal writer
        if writer is None:
            writer = StoreWriter(folder, vocab_size=len(tokenizer), width=len(texts[0]))
        where = np.full(len(chunk.records), -1, dtype=np.int64)
        labels = [r["label"] for r in chunk.records] if "label" in chunk.records[0] else None  # unpaired examples
        where[enc.kept] = writer.add(enc, chunk.start, labels)
        position.append(where)
        flags.append(enc.flags)
        eos.append(enc.eos)
        for i in enc.kept[:max(0, SAMPLES - len(samples))].tolist():
            samples[chunk.start + i] = (chunk.records[i], texts[i], chunk.origins[i])

    # One chunk is tokenized in a worker thread (the Rust batch call releases the GIL) while this thread reads,
    # validates and renders the next one and stores the one before: chunks keep their order.
    pending = None
    # render_guard: the chat template's time limit is armed per row, its signal handler installed once
    with ThreadPoolExecutor(1) as worker, render_guard(), \
            tqdm(total=_expected_rows(stream), desc=desc, unit="pair", disable=not progress, leave=False) as bar:
        for chunk in stream:
            n = len(chunk.records)
            if stream.failed:  # the load will raise at the end: only validate the rest
                bar.update(n)
                continue
            parts = (("prompt", "chosen", "rejected") if "chosen" in chunk.records[0] else
                     ("prompt", "completion", "label") if "label" in chunk.records[0] else ("prompt", "completion"))
            dup += b"".join(_digest(r, parts) for r in chunk.records)
            if rank_seed is not None:
                ranks += prompt_ranks(chunk.records, rank_seed)
            texts = [render_record(tokenizer, r) for r in chunk.records]
            job = (chunk, texts, worker.submit(encoder, texts))
            if pending is not None:
                store(pending[0], pending[1], pending[2].result())
            pending = job
            bar.update(n)
        if pending is not None:
            store(pending[0], pending[1], pending[2].result())
    loaded = stream.finish()
    if writer is None:  # no record at all (finish() raises before this for a real source)
        writer = StoreWriter(folder, vocab_size=len(tokenizer), width=3 if loaded.kind == "preference" else 2)

    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return Built(loaded, writer.close(), cat(position, np.int64), cat(flags, np.uint8), cat(eos, np.uint8),
                 np.frombuffer(bytes(dup), dtype="S16"),
                 np.frombuffer(bytes(ranks), dtype="S32") if rank_seed is not None else None, samples)


def find_record(source: Any, load_kwargs: dict, index: int) -> tuple[dict, str]:
    """(record, origin) of valid record number `index`, read again (when it is not among the samples)."""
    for chunk in RecordStream(source, **load_kwargs):
        if chunk.start + len(chunk.records) > index:
            return chunk.records[index - chunk.start], chunk.origins[index - chunk.start]
    raise IndexError(index)


def _expected_rows(stream: RecordStream) -> int | None:
    """Rows to expect, for the progress bar's ETA: lines of plain files, rows of Parquet files; None if unknown."""
    total = 0
    for inp in stream.inputs:
        if inp.how != "file" or inp.path is None:
            return None
        name = inp.path.name.lower()
        try:
            if name.endswith(".parquet"):
                import pyarrow.parquet as pq

                total += pq.ParquetFile(str(inp.path)).metadata.num_rows
            elif name.endswith((".jsonl", ".ndjson")):
                total += sum(block.count(b"\n") for block in _blocks(inp.path))
            else:
                return None
        except Exception:  # a broken file: reading it reports the problem, the progress bar need not
            return None
    return total


def _blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(1 << 23):
            yield block
