"""Which pairs go together: the epoch's batch order and its cut into per-process micro-batches."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from preftune.data.store import padded_lengths
from preftune.data.tokenize import TokenizedPair


def batch_order(lengths: Sequence[int] | np.ndarray, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                group_by_length: bool = True) -> list[list[int]]:
    """The batches of one epoch as lists of dataset positions, a pure function of (seed, epoch).

    Being a pure function is what makes resume exact: a resumed run recomputes the same order and skips
    the batches already done. With group_by_length, pairs are shuffled, cut into mega-batches of 64
    batches, sorted by length inside each (longest first, ties in shuffled order), and the resulting batches
    shuffled again, so padding stays small while every epoch still sees a different order.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        # a stable sort by descending length within each mega-batch, vectorised (same order as sorted(key=-len))
        mega = batch_size * 64
        arr, neg = np.asarray(order, dtype=np.int64), -np.asarray(lengths, dtype=np.int64)
        order = np.concatenate([arr[s:s + mega][np.argsort(neg[arr[s:s + mega]], kind="stable")]
                                for s in range(0, len(arr), mega)] or [arr]).tolist()
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def micro_batches(pairs: Sequence[TokenizedPair], *, batch_size: int, accumulation: int, seed: int, epoch: int,
                  group_by_length: bool, num_processes: int = 1, process_index: int = 0) -> list[list[list[int]]]:
    """Optimizer steps of one epoch, each a list of this process's micro-batches (lists of positions).

    The order is drawn per *global* batch and only then cut into micro-batches, so gradient accumulation
    4×2 sees exactly the pairs of one batch of 8. `pairs` may be a `preftune.data.store.Pairs` view: only its
    lengths array is read.
    """
    per_step = batch_size * accumulation * num_processes
    lengths = padded_lengths(pairs).tolist()
    steps = []
    for global_batch in batch_order(lengths, per_step, seed=seed, epoch=epoch, group_by_length=group_by_length):
        if group_by_length:
            global_batch = sorted(global_batch, key=lambda j: -lengths[j])
        micro = [global_batch[s:s + batch_size] for s in range(0, len(global_batch), batch_size)]
        steps.append(micro[process_index::num_processes] or [global_batch[:1]])
    return steps


def used_positions(pairs: Sequence[TokenizedPair], steps: int, *, batch_size: int, accumulation: int, seed: int,
                   group_by_length: bool, num_processes: int = 1) -> np.ndarray:
    """Sorted positions of every pair the first `steps` optimizer steps train on (all processes together): the
    order is a pure function of (seed, epoch), so a run knows up front which pairs it needs reference
    log-probs for."""
    per_step = batch_size * accumulation * num_processes
    lengths = padded_lengths(pairs).tolist()
    used: list[list[int]] = []
    epoch = 0
    while steps > 0:
        batches = batch_order(lengths, per_step, seed=seed, epoch=epoch, group_by_length=group_by_length)
        used += batches[:steps]
        steps -= len(batches)
        epoch += 1
    return np.unique(np.fromiter((i for b in used for i in b), dtype=np.int64))
