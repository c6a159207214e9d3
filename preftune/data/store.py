"""Tokenized pairs on disk as flat numpy arrays, memory-mapped: what a training run keeps of its data.

One folder holds, for n kept pairs with k answers (2 for preference pairs, 1 for SFT):

    ids.bin      every pair's tokens laid out [prompt | chosen | rejected], pair after pair (uint16 when the
                 vocabulary fits, else int32)
    lengths.bin  int32 [n, 1 + k]: prompt and answer lengths (the layout's offsets are their running sum)
    index.bin    int64 [n]: each pair's position among the data's valid records
    labels.bin   uint8 [n]: unpaired examples' labels (1 = desirable), only for them

Why plain numpy files rather than Arrow (`datasets`): measured on 200k pairs (BENCHMARKS.md, data at scale),
writing, opening and gathering a batch are all cheaper, and nothing but the ids of one batch is ever turned
into Python objects; the sampler needs only the lengths, which are a small in-memory array. Memory-mapped
ids cost no RAM until a batch reads them, so a million pairs train in the memory of a few.

`Pairs` is a view (a subset of positions) of a store: a `Sequence[TokenizedPair]` that builds a pair's lists
only when asked, with the arrays the sampler, the scoring loop and the reference cache need.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from preftune.data.tokenize import TokenizedPair
from preftune.errors import PreftuneError


class StoreWriter:
    """Appends `preftune.data.encode.EncodedChunk`s to a store folder; `close()` gives the store's meta."""

    def __init__(self, folder: Path, *, vocab_size: int, width: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.width = folder, width
        self.dtype = np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)
        self.files = {name: (folder / f"{name}.bin").open("wb") for name in ("ids", "lengths", "index")}
        self.hash = hashlib.sha256()
        self.n = self.tokens = self.largest_id = 0

    def add(self, chunk: Any, start: int, labels: np.ndarray | None = None) -> np.ndarray:
        """Write the kept pairs of `chunk`, whose first text is record `start` (and, for unpaired examples, the
        labels of the chunk's records); returns their store positions."""
        ids = chunk.ids.astype(self.dtype)
        lengths = np.ascontiguousarray(chunk.lengths, dtype=np.int32).reshape(-1, self.width)
        index = (chunk.kept + start).astype(np.int64)
        arrays = [("ids", ids), ("lengths", lengths), ("index", index)]
        if labels is not None:
            if "labels" not in self.files:
                self.files["labels"] = (self.folder / "labels.bin").open("wb")
            arrays.append(("labels", np.asarray(labels, dtype=np.uint8)[chunk.kept]))
        for name, arr in arrays:
            data = arr.tobytes()
            self.files[name].write(data)
            self.hash.update(data)
        positions = np.arange(self.n, self.n + len(index), dtype=np.int64)
        self.n += len(index)
        self.tokens += len(ids)
        self.largest_id = max(self.largest_id, int(ids.max()) if len(ids) else 0)
        return positions

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        return {"pairs": self.n, "tokens": self.tokens, "width": self.width, "dtype": self.dtype.name,
                "digest": self.hash.hexdigest(), "largest_id": self.largest_id, "labels": "labels" in self.files}


class PairStore:
    """A store folder opened read-only: ids memory-mapped, lengths and record indices in memory (small)."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        n, width = meta["pairs"], meta["width"]
        dtype = np.dtype(meta["dtype"])
        self.ids = (np.memmap(folder / "ids.bin", dtype=dtype, mode="r", shape=(meta["tokens"],))
                    if meta["tokens"] else np.zeros(0, dtype=dtype))
        self.lengths = np.fromfile(folder / "lengths.bin", dtype=np.int32).reshape(n, width)
        self.index = np.fromfile(folder / "index.bin", dtype=np.int64)
        self.labels = np.fromfile(folder / "labels.bin", dtype=np.uint8).astype(bool) if meta.get("labels") else None
        totals = self.lengths.sum(axis=1, dtype=np.int64)
        self.starts = np.cumsum(totals) - totals
        self.digest = meta["digest"]
        # known from writing, so checking the vocabulary reads no page of ids.bin (260 MiB at 1M pairs)
        self.largest_id = meta.get("largest_id")

    def pairs(self, positions: np.ndarray | None = None) -> Pairs:
        return Pairs(self, np.arange(len(self.index), dtype=np.int64) if positions is None else positions)


class Pairs(Sequence[TokenizedPair]):
    """Some pairs of a `PairStore` (`positions` into it), in order; pairs[i] builds that pair's id lists."""

    def __init__(self, store: PairStore, positions: np.ndarray):
        self.store, self.positions = store, np.asarray(positions, dtype=np.int64)
        self.lengths = store.lengths[self.positions]  # [n, 1 + k]: prompt, answers
        self._padded: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, i: int) -> TokenizedPair: ...

    @overload
    def __getitem__(self, i: slice) -> Pairs: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        pos = int(self.positions[i])
        start = int(self.store.starts[pos])
        lengths = self.store.lengths[pos].tolist()
        ids = self.store.ids[start:start + sum(lengths)]
        largest = self.store.largest_id
        if largest is not None and len(ids) and int(ids.max()) > largest:  # a pair's max: no extra page read
            raise PreftuneError(f"the tokenized data in {self.store.folder} holds token id {int(ids.max()):,}, above "
                                f"the largest it was written with ({largest:,}): its ids.bin changed after it was "
                                "written; delete that cache folder so the data is tokenized again.")
        parts, at = [], 0
        for n in lengths:
            parts.append(ids[at:at + n].tolist())
            at += n
        label = bool(self.store.labels[pos]) if self.store.labels is not None else None
        return TokenizedPair(parts[0], parts[1], parts[2] if len(parts) > 2 else None, int(self.store.index[pos]),
                             label)

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    @property
    def padded_lengths(self) -> np.ndarray:
        """prompt + the longer answer per pair: `TokenizedPair.padded_length` for all at once."""
        if self._padded is None:
            self._padded = (self.lengths[:, 0] + self.lengths[:, 1:].max(axis=1)).astype(np.int64)
        return self._padded

    @property
    def labels(self) -> np.ndarray | None:
        """Unpaired examples' labels (True: desirable), None for pairs and SFT examples."""
        return None if self.store.labels is None else self.store.labels[self.positions]

    @property
    def index(self) -> np.ndarray:
        """Each pair's position among the data's valid records."""
        return self.store.index[self.positions]

    def subset(self, positions: Sequence[int] | np.ndarray) -> Pairs:
        """The pairs at `positions` of this view (a view of the same store)."""
        return Pairs(self.store, self.positions[np.asarray(positions, dtype=np.int64)])

    def digest(self) -> str:
        """A hash of exactly these pairs' token ids, in order: the store's digest (of all its ids, lengths and
        indices) and the positions taken from it. Hashing the arrays' bytes keeps it fast at any size."""
        h = hashlib.sha256(self.store.digest.encode())
        h.update(self.positions.tobytes())
        return h.hexdigest()


def padded_lengths(pairs: Sequence[TokenizedPair]) -> np.ndarray:
    """`TokenizedPair.padded_length` of every pair: from the arrays of `Pairs`, else one by one."""
    if isinstance(pairs, Pairs):
        return pairs.padded_lengths
    return np.fromiter((p.padded_length for p in pairs), dtype=np.int64, count=len(pairs))


def largest_id(pairs: Sequence[TokenizedPair]) -> int:
    """The largest token id the pairs use (0 for none): for `Pairs`, over their store's ids (the data they are
    taken from), read straight from the memory-mapped array."""
    if isinstance(pairs, Pairs):
        if pairs.store.largest_id is None:  # a store written before the meta kept it
            return int(pairs.store.ids.max()) if len(pairs.store.ids) else 0
        return pairs.store.largest_id
    return max((max(p.prompt_ids + p.chosen_ids + (p.rejected_ids or []), default=0) for p in pairs), default=0)


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """A hash of the pairs' token ids in order, from arrays: `Pairs.digest()`, or for a list the bytes of its
    lengths and ids."""
    if isinstance(pairs, Pairs):
        return pairs.digest()
    h = hashlib.sha256()
    for p in pairs:
        parts = [p.prompt_ids, p.chosen_ids] + ([] if p.rejected_ids is None else [p.rejected_ids])
        h.update(np.array([len(x) for x in parts], dtype=np.int64).tobytes())
        h.update(np.fromiter((i for x in parts for i in x), dtype=np.int64).tobytes())
    return h.hexdigest()
