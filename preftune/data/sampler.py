"""Which pairs go together: the epoch's batch order and its cut into per-process micro-batches."""

from __future__ import annotations

import random
from collections.abc import Sequence

from preftune.data.tokenize import TokenizedPair


def batch_order(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                group_by_length: bool = True) -> list[list[int]]:
    """The batches of one epoch as lists of dataset positions, a pure function of (seed, epoch).

    Being a pure function is what makes resume exact: a resumed run recomputes the same order and skips
    the batches already done. With group_by_length, pairs are shuffled, cut into mega-batches of 64
    batches, sorted by length inside each, and the resulting batches shuffled again, so padding stays
    small while every epoch still sees a different order.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 64
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def micro_batches(pairs: Sequence[TokenizedPair], *, batch_size: int, accumulation: int, seed: int, epoch: int,
                  group_by_length: bool, num_processes: int = 1, process_index: int = 0) -> list[list[list[int]]]:
    """Optimizer steps of one epoch, each a list of this process's micro-batches (lists of positions).

    The order is drawn per *global* batch and only then cut into micro-batches, so gradient accumulation
    4×2 sees exactly the pairs of one batch of 8.
    """
    per_step = batch_size * accumulation * num_processes
    lengths = [p.padded_length for p in pairs]
    steps = []
    for global_batch in batch_order(lengths, per_step, seed=seed, epoch=epoch,
                                    group_by_length=group_by_length):
        if group_by_length:
            global_batch = sorted(global_batch, key=lambda j: -lengths[j])
        micro = [global_batch[s:s + batch_size] for s in range(0, len(global_batch), batch_size)]
        steps.append(micro[process_index::num_processes] or [global_batch[:1]])
    return steps
