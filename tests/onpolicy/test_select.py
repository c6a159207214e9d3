"""Selection rules on hand-made scores: ties, min_gap, best-random's seeded draw, all-pairs' order and cap."""

from __future__ import annotations

import random

from preftune.onpolicy.select import Selection, prompt_rng, select_pairs


def test_best_worst_picks_the_extremes_and_breaks_ties_by_draw_order():
    # scores 3, 7, 1, 7, 1: the best is the first 7 (index 1), the worst the first 1 (index 2); gap 6.
    assert select_pairs([3, 7, 1, 7, 1], "best-worst") == Selection(pairs=[(1, 2)])
    assert select_pairs([2.0, 2.0, 2.0], "best-worst") == Selection(ties=1)
    # gap 7 - 1 = 6: kept at min_gap 6 (the bound is inclusive), dropped at 6.5
    assert select_pairs([3, 7, 1], "best-worst", min_gap=6).pairs == [(1, 2)]
    assert select_pairs([3, 7, 1], "best-worst", min_gap=6.5) == Selection(small_gap=1)
    assert select_pairs([5.0], "best-worst") == Selection()  # one distinct answer: nothing to compare


def test_best_random_draws_among_answers_far_enough_below_the_best():
    scores = [9, 8.5, 4, 3, 9]  # best: index 0 (first 9); 8.5 is 0.5 below, 4 and 3 are 5 and 6 below
    seen = {select_pairs(scores, "best-random", min_gap=1, rng=random.Random(s)).pairs[0] for s in range(40)}
    assert seen == {(0, 2), (0, 3)}  # never the other 9 (a tie) nor 8.5 (gap 0.5 < 1)
    seen = {select_pairs(scores, "best-random", rng=random.Random(s)).pairs[0] for s in range(60)}
    assert seen == {(0, 1), (0, 2), (0, 3)}
    assert select_pairs([9, 9], "best-random") == Selection(ties=1)
    assert select_pairs([9, 8.5, 9], "best-random", min_gap=1) == Selection(small_gap=1)
    # seeded per (seed, prompt): the same draw whichever prompts came before
    a = select_pairs(scores, "best-random", rng=prompt_rng(3, 17)).pairs
    random.random()
    assert select_pairs(scores, "best-random", rng=prompt_rng(3, 17)).pairs == a
    draws = {select_pairs(scores, "best-random", rng=prompt_rng(3, k)).pairs[0] for k in range(30)}
    assert len(draws) == 3  # other prompts draw otherwise


def test_all_pairs_sorted_by_gap_with_ties_small_gaps_and_the_cap_counted():
    # scores a=4, b=1, c=4, d=3.5: pairs (a,b) 3, (c,b) 3, (a,d) .5, (c,d) .5, (d,b) 2.5; (a,c) a tie.
    sel = select_pairs([4, 1, 4, 3.5], "all-pairs")
    assert sel.pairs == [(0, 1), (2, 1), (3, 1), (0, 3), (2, 3)] and sel.ties == 1
    sel = select_pairs([4, 1, 4, 3.5], "all-pairs", min_gap=1, max_pairs=2)
    assert sel == Selection(pairs=[(0, 1), (2, 1)], ties=1, small_gap=2, over_cap=1)
