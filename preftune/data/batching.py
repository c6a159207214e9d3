"""Which pairs run together, and on which process: dataset positions only (collate.py makes them tensors).

Training (`TrainOrder` puts these together for a run): `batch_order` draws an epoch's global batches (a pure function of seed and epoch, so a resume recomputes
it), `micro_batches` cuts each into micro-batches, `rank_share` gives every process its part of one global batch,
and `used_positions` says up front which pairs the run's steps will see. Scoring (the reference pass, evaluation,
`preftune eval`): `length_sorted_share` orders pairs longest first and gives every process every world-th.

The filler convention, one for both: every process runs the same number of batches, because under several
processes each forward or backward may be a collective (DDP's all-reduce, FSDP2's all-gathers, ZeRO's
reductions) that a process skipping one would leave waiting forever. A process whose share is shorter runs
*filler* batches after its own: the shared order's first pair alone. A `Share` keeps them apart (`fillers`),
and the caller runs them and counts nothing from them (training multiplies their loss by 0; scoring and
evaluation drop their outputs).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from preftune.data.store import padded_lengths
from preftune.data.tokenize import TokenizedPair


class Share(NamedTuple):
    """One process's batches (lists of dataset positions) and the filler batches it runs after them."""

    batches: list[list[int]]
    fillers: list[list[int]]

    def runs(self) -> Iterator[tuple[list[int], bool]]:
        """(positions, is_filler) of every batch this process runs, its own first."""
        for batch in self.batches:
            yield batch, False
        for batch in self.fillers:
            yield batch, True


def _filled(mine: list[list[int]], most: int, first: int) -> Share:
    """`mine` brought up to `most` batches with fillers: the shared order's `first` pair alone (see above)."""
    return Share(mine, [[first]] * (most - len(mine)))


def rank_share(micro: list[list[int]], rank: int, world: int) -> Share:
    """Process `rank`'s micro-batches of one global batch (every world-th) and its fillers (the global batch's first
    pair). Example: 3 micro-batches on 2 processes → rank 0 runs 2, rank 1 runs 1 and one filler."""
    return _filled(micro[rank::world], -(-len(micro) // world), micro[0][0])


def length_sorted_share(pairs: Sequence[TokenizedPair], batch_size: int, *, rank: int = 0, world: int = 1) -> Share:
    """Batches of `batch_size` over `pairs`, longest first so each batch pads little; process `rank` of `world`
    takes every world-th pair of that order, so the processes' shares are disjoint and of similar cost. Its
    fillers are the longest pair (rank 0's share is the longest)."""
    # a stable sort, longest first: the same order as sorted(key=-padded_length), from a lengths array
    order = np.argsort(-padded_lengths(pairs), kind="stable").tolist()
    mine = order[rank::world]
    batches = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
    if not order:
        return Share(batches, [])
    return _filled(batches, -(-len(order[0::world]) // batch_size), order[0])


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
                  group_by_length: bool) -> list[list[list[int]]]:
    """Optimizer steps of one epoch, each its global batch cut into micro-batches of `batch_size` (lists of
    positions); `accumulation`: micro-batches per step over all processes (gradient accumulation × processes).

    The order is drawn per *global* batch and only then cut, so accumulation 4×2 or 2 processes × 2 see exactly
    the pairs of one batch of 8 (`rank_share` then gives each process its part). `pairs` may be a
    `preftune.data.store.Pairs` view: only its lengths array is read.
    """
    lengths = padded_lengths(pairs).tolist()
    steps = []
    for global_batch in batch_order(lengths, batch_size * accumulation, seed=seed, epoch=epoch,
                                    group_by_length=group_by_length):
        if group_by_length:
            global_batch = sorted(global_batch, key=lambda j: -lengths[j])
        steps.append([global_batch[s:s + batch_size] for s in range(0, len(global_batch), batch_size)])
    return steps


def used_positions(pairs: Sequence[TokenizedPair], steps: int, *, batch_size: int, accumulation: int, seed: int,
                   group_by_length: bool) -> np.ndarray:
    """Sorted positions of every pair the first `steps` optimizer steps train on (all processes together; the
    settings as for `micro_batches`): the order is a pure function of (seed, epoch), so a run knows up front which
    pairs it needs reference log-probs for."""
    lengths = padded_lengths(pairs).tolist()
    used: list[list[int]] = []
    epoch = 0
    while steps > 0:
        batches = batch_order(lengths, batch_size * accumulation, seed=seed, epoch=epoch,
                              group_by_length=group_by_length)
        used += batches[:steps]
        steps -= len(batches)
        epoch += 1
    return np.unique(np.fromiter((i for b in used for i in b), dtype=np.int64))


@dataclass
class TrainOrder:
    """A run's steps over `pairs`: each optimizer step one global batch of batch_size × accumulation × world pairs
    (`micro_batches`), of which process `rank` of `world` runs its share (`rank_share`): the same pairs in the same
    steps whatever the launch shape, for a given global batch. One epoch's order is kept at a time."""

    pairs: Sequence[TokenizedPair]
    batch_size: int
    accumulation: int  # gradient accumulation steps of each process
    seed: int
    group_by_length: bool = True
    rank: int = 0
    world: int = 1
    steps_per_epoch: int = field(init=False)
    _epoch: tuple[int, list[Share]] = field(init=False, repr=False, default=(-1, []))
    _global: tuple[int, list[list[list[int]]]] = field(init=False, repr=False, default=(-1, []))

    def __post_init__(self) -> None:
        self.steps_per_epoch = len(micro_batches(self.pairs, epoch=0, **self._settings()))

    def _settings(self) -> dict[str, Any]:
        return dict(batch_size=self.batch_size, accumulation=self.accumulation * self.world, seed=self.seed,
                    group_by_length=self.group_by_length)

    def share(self, step: int) -> Share:
        """This process's micro-batches and fillers of optimizer step `step` (counted from 0 over all epochs)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch[0] != epoch:  # the order is a pure function of (seed, epoch): recomputed, never stored
            steps = micro_batches(self.pairs, epoch=epoch, **self._settings())
            self._epoch = (epoch, [rank_share(micro, self.rank, self.world) for micro in steps])
        return self._epoch[1][position]

    def used(self, steps: int) -> np.ndarray:
        """Sorted positions of every pair the first `steps` steps train on, all processes together."""
        return used_positions(self.pairs, steps, **self._settings())

    def global_batch(self, step: int) -> list[int]:
        """Every process's pairs of optimizer step `step`, in the order the micro-batches cut them (KTO pairs each
        prompt with the previous example's answer across it)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._global[0] != epoch:  # like `share`: one epoch's order at a time
            self._global = (epoch, micro_batches(self.pairs, epoch=epoch, **self._settings()))
        return [i for micro in self._global[1][position] for i in micro]

    def settings(self) -> dict[str, Any]:
        """What the order is a pure function of, besides the pairs and the epoch (a cache key's part)."""
        return self._settings()
