"""Which pairs run together and where (preftune.data.batching): the epoch's order, the global batch cut into
micro-batches, each process's share, and the one filler convention (the shared order's first pair, run last and
counted nowhere) for training's and scoring's shares."""

from __future__ import annotations

import random

import pytest

from preftune.data.batching import (
    Share,
    TrainOrder,
    batch_order,
    length_sorted_share,
    micro_batches,
    rank_share,
    used_positions,
)
from preftune.data.tokenize import TokenizedPair


def _pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    return [TokenizedPair([1] * rng.randint(1, 9), [2] * rng.randint(1, 6), [3] * rng.randint(1, 6), i)
            for i in range(n)]


def test_batch_order_is_deterministic_and_complete():
    lengths = [i % 17 for i in range(100)]
    a = batch_order(lengths, 8, seed=1, epoch=0)
    assert a == batch_order(lengths, 8, seed=1, epoch=0)
    assert a != batch_order(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(100))
    # grouped by length: within a batch the spread is small compared with random batches
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a)
    plain = batch_order(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)


def test_rank_share_gives_every_process_the_same_number_of_micro_batches():
    """3 micro-batches on 2 processes: rank 0 takes the 1st and 3rd, rank 1 the 2nd plus one filler (the global
    batch's first pair); 1 micro-batch on 2: rank 1 only a filler; 4 on 2: no filler."""
    micro = [[5, 6], [7, 8], [9]]
    assert rank_share(micro, 0, 2) == ([[5, 6], [9]], [])
    assert rank_share(micro, 1, 2) == ([[7, 8]], [[5]])
    assert rank_share([[4, 2]], 1, 2) == ([], [[4]])
    assert rank_share([[1], [2], [3], [4]], 1, 2) == ([[2], [4]], [])
    assert rank_share(micro, 0, 1) == (micro, [])
    assert list(rank_share(micro, 1, 2).runs()) == [([7, 8], False), ([5], True)]  # own batches first


@pytest.mark.parametrize("batch_size, accumulation, processes",
                         [(8, 1, 2), (4, 2, 2), (2, 2, 4), (4, 1, 4), (1, 16, 1), (2, 1, 8)])
def test_every_launch_shape_of_a_global_batch_of_16_sees_the_same_pairs_each_step(batch_size, accumulation,
                                                                                processes):
    """What the recipe does (micro_batches over the global batch, then rank_share) puts exactly the pairs of a
    one-process batch of 16 into each step, split over the processes, in the same number of micro-batches per
    process. 45 pairs: steps of 16, 16 and 13."""
    pairs = _pairs(45)
    kw = dict(seed=7, epoch=1, group_by_length=True)
    one = micro_batches(pairs, batch_size=16, accumulation=1, **kw)
    steps = micro_batches(pairs, batch_size=batch_size, accumulation=accumulation * processes, **kw)
    assert [len(m[0]) for m in one] == [16, 16, 13] and len(steps) == 3
    for step, micro in enumerate(steps):
        shares = [rank_share(micro, r, processes) for r in range(processes)]
        assert len({len(mine) + len(fill) for mine, fill in shares}) == 1
        real = [i for mine, _ in shares for m in mine for i in m]
        assert sorted(real) == sorted(one[step][0]) and len(real) == len(set(real))
        assert all(len(m) <= batch_size for mine, _ in shares for m in mine)


def test_length_sorted_share_splits_ranks_disjointly_with_fillers():
    """7 pairs of lengths 8..2 on 2 processes, batches of 3: rank 0 takes the 1st, 3rd, 5th, 7th longest
    (2 batches), rank 1 the 2nd, 4th, 6th (1 batch) plus a filler: the longest pair, position 0, as training's
    filler is its global batch's first pair. 1 pair on 2 processes: rank 1 runs only the filler."""
    pairs = [TokenizedPair([1] * (7 - i), [2], [3], i) for i in range(7)]  # pair i: padded length 8 - i
    assert length_sorted_share(pairs, 3, rank=0, world=2) == Share([[0, 2, 4], [6]], [])
    assert length_sorted_share(pairs, 3, rank=1, world=2) == Share([[1, 3, 5]], [[0]])
    assert length_sorted_share(pairs, 3) == ([[0, 1, 2], [3, 4, 5], [6]], [])  # one process: no fillers
    assert length_sorted_share(pairs[:1], 3, rank=1, world=2) == ([], [[0]])
    assert length_sorted_share([], 3, rank=1, world=2) == ([], [])


def test_a_runs_order_counts_steps_across_epochs_and_shares_each_global_batch():
    """45 pairs, 4 per device × 2 accumulation × 2 processes = global batches of 16: 3 steps an epoch (16, 16, 13).
    Step 4 is epoch 1's second global batch, exactly one process's batch of 16 at step 4, split between the two
    ranks; the first 2 steps use the 32 pairs of epoch 0's first two global batches, 5 steps all 45."""
    pairs = _pairs(45)
    ranks = [TrainOrder(pairs, 4, 2, seed=7, rank=r, world=2) for r in (0, 1)]
    one = TrainOrder(pairs, 16, 1, seed=7)
    assert ranks[0].steps_per_epoch == one.steps_per_epoch == 3
    micro = micro_batches(pairs, batch_size=4, accumulation=4, seed=7, epoch=1, group_by_length=True)[1]
    assert [order.share(4) for order in ranks] == [rank_share(micro, r, 2) for r in (0, 1)]
    assert sorted(i for order in ranks for m in order.share(4).batches for i in m) == sorted(one.share(4).batches[0])
    first_two = sorted(i for step in (0, 1) for i in one.share(step).batches[0])
    assert ranks[1].used(2).tolist() == one.used(2).tolist() == first_two and len(first_two) == 32
    assert ranks[0].used(5).tolist() == used_positions(pairs, 5, batch_size=16, accumulation=1, seed=7,
                                                       group_by_length=True).tolist() == list(range(45))
