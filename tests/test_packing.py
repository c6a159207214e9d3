"""The packed layout (prompt·chosen·rejected as one sequence) against hand-derived positions and masks, and
its FlexAttention BlockMask against the dense mask (forward only: FlexAttention has no CPU backward)."""

from __future__ import annotations

import pytest
import torch

from preftune import packing
from preftune.data.collate import collate
from preftune.data.tokenize import TokenizedPair

# Pair A: prompt 5 6 7, chosen 8 9, rejected 10 11 12 (8 tokens). Pair B: prompt 20, chosen 21-24, rejected 25.
PAIRS = [TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12], 0), TokenizedPair([20], [21, 22, 23, 24], [25], 1)]


def _batch(pairs=PAIRS):
    return collate(pairs, range(len(pairs)), pad_id=0)


def test_pair_rows_positions_kinds_and_predictors():
    """Row A: positions 0 1 2 | 3 4 | 3 4 5 (the rejected answer restarts at the prompt's end, 3).
    Row B: 0 | 1 2 3 4 | 1, then two pads (positions are their columns, 6 7; kind -1, document -1).
    Each answer token is predicted by the state one column before it, except rejected token 0, which is
    predicted by the prompt's last state: A's chosen 8 9 at columns 2 3; B's chosen at row 1 columns 0-3
    (flat 8-11); A's rejected 10 11 12 at columns 2 5 6; B's rejected 25 at column 0 (flat 8)."""
    p = packing.pack(_batch(), rows="pair")
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 4, 1, 6, 7]]
    assert p.kind.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 2, -1, -1]]
    assert p.doc.tolist() == [[0] * 8, [1] * 6 + [-1, -1]]
    assert p.predict.tolist() == [2, 3, 8, 9, 10, 11, 2, 5, 6, 8]
    assert p.targets.tolist() == [8, 9, 21, 22, 23, 24, 10, 11, 12, 25]
    assert p.seq.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 3] and p.num_sequences == 4


def test_one_row_has_no_padding_between_pairs():
    """14 real tokens in one row, B right after A (offset 8), padded to 16 at the tail only."""
    p = packing.pack(_batch(), rows="packed", pad_to=4)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22, 23, 24, 25, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 3, 4, 1, 0, 0]]
    assert p.doc.tolist() == [[0] * 8 + [1] * 6 + [-1, -1]]
    assert p.predict.tolist() == [2, 3, 8, 9, 10, 11, 2, 5, 6, 8]


def test_dense_mask_rejected_never_sees_chosen():
    """Row A (P P P C C R R R): causal, except that rejected queries (rows 5-7) skip the chosen keys 3 4.
    Row B: pads (columns 6 7) see only pads, so no query row is empty (an empty row would give NaN)."""
    m = packing.dense_mask(packing.pack(_batch(), rows="pair"))
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    a = ["10000000",
         "11000000",
         "11100000",
         "11110000",
         "11111000",
         "11100100",
         "11100110",
         "11100111"]
    b = ["10000000",
         "11000000",
         "11100000",
         "11110000",
         "11111000",
         "10000100",
         "00000010",
         "00000011"]
    for row, want in ((0, a), (1, b)):
        assert ["".join(str(int(x)) for x in r) for r in m[row, 0].tolist()] == want
    add = packing.dense_mask(packing.pack(_batch(), rows="pair"), torch.float32)
    assert add[0, 0, 5, 3] == torch.finfo(torch.float32).min and add[0, 0, 5, 2] == 0


def test_one_row_mask_keeps_pairs_apart():
    m = packing.dense_mask(packing.pack(_batch(), rows="packed", pad_to=4))[0, 0]
    assert not m[8:14, :8].any() and not m[:8, 8:].any()  # no attention across pairs
    assert m[13, 8] and not m[13, 9]  # B's rejected sees B's prompt, not B's chosen


def test_sft_layout_is_prompt_then_answer():
    p = packing.pack(_batch([TokenizedPair([5, 6], [7, 8, 9], None, 0)]), rows="pair")
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9]] and p.position_ids.tolist() == [[0, 1, 2, 3, 4]]
    assert p.predict.tolist() == [1, 2, 3] and p.num_sequences == 1
    assert packing.dense_mask(p)[0, 0].equal(torch.ones(5, 5, dtype=torch.bool).tril())


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="non-empty prompt"):
        packing.pack(_batch([TokenizedPair([], [7], [8], 0)]))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_equals_dense_mask():
    """FlexAttention with the BlockMask (eager, forward only) = sdpa with the dense mask, on a row of 4
    pairs long enough (S = 512) that whole 128-blocks between pairs are skipped (sparsity > 0)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    lengths = [(60, 30, 20), (10, 70, 45), (90, 5, 9), (40, 30, 50)]
    pairs = []
    for i, (lp, lc, lr) in enumerate(lengths):
        ids = torch.randint(4, 100, (lp + lc + lr,), generator=g).tolist()
        pairs.append(TokenizedPair(ids[:lp], ids[lp:lp + lc], ids[lp + lc:], i))
    p = packing.pack(_batch(pairs), rows="packed", pad_to=128)
    assert p.input_ids.shape == (1, 512)
    bm = packing.block_mask(p)
    assert bm.sparsity() > 0
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=bm)
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=packing.dense_mask(p))
    # Same scores, softmax and sums in fp32, only the summation order differs: ~1e-7.
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)
