"""Which answers of a prompt become (chosen, rejected) pairs, given the judge's scores: pure functions.

    best-worst   the highest-scored answer against the lowest (one pair; the usual on-policy recipe)
    best-random  the highest against one drawn at random (seeded per prompt) among those at least `min_gap`
                 below it (one pair; a gap distribution less extreme than best-worst's)
    all-pairs    every two answers with different scores, the larger gaps first, at most
                 `max_pairs` (0 = all)

A candidate pair whose answers score the same is a tie and one whose gap (chosen score − rejected score) is
below `min_gap` is too close; both are dropped and counted, since DPO learns little from a pair the judge hardly
tells apart. Ties in the best or worst place go to the answer drawn first (the lowest sample index).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

RULES = ("best-worst", "best-random", "all-pairs")


@dataclass
class Selection:
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (chosen, rejected) positions in the scores
    ties: int = 0  # candidate pairs dropped because both answers scored the same
    small_gap: int = 0  # candidate pairs dropped because the gap was below min_gap
    over_cap: int = 0  # all-pairs candidates beyond max_pairs


def prompt_rng(seed: int, key: int) -> random.Random:
    """best-random's generator for the prompt with `key`: its own, so the draw never depends on other prompts."""
    digest = hashlib.blake2b(f"select:{seed}:{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def select_pairs(scores: Sequence[float], rule: str, *, min_gap: float = 0.0, max_pairs: int = 0,
                 rng: random.Random | None = None) -> Selection:
    """The pairs `rule` makes of one prompt's answer `scores` (see the module docstring)."""
    n = len(scores)
    if n < 2:
        return Selection()
    best = max(range(n), key=lambda i: (scores[i], -i))
    if rule == "best-worst":
        worst = min(range(n), key=lambda i: (scores[i], i))
        return _one(scores, best, worst, min_gap)
    if rule == "best-random":
        lower = [j for j in range(n) if scores[j] < scores[best]]
        if not lower:
            return Selection(ties=1)
        far = [j for j in lower if scores[best] - scores[j] >= min_gap]
        if not far:
            return Selection(small_gap=1)
        return Selection(pairs=[(best, (rng or random.Random(0)).choice(far))])
    if rule == "all-pairs":
        return _all_pairs(scores, min_gap, max_pairs)
    raise ValueError(f"unknown selection rule {rule!r}; use one of {', '.join(RULES)}")


def _one(scores: Sequence[float], chosen: int, rejected: int, min_gap: float) -> Selection:
    gap = scores[chosen] - scores[rejected]
    if gap == 0:
        return Selection(ties=1)
    if gap < min_gap:
        return Selection(small_gap=1)
    return Selection(pairs=[(chosen, rejected)])


def _all_pairs(scores: Sequence[float], min_gap: float, max_pairs: int) -> Selection:
    out = Selection()
    kept = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            hi, lo = (i, j) if scores[i] >= scores[j] else (j, i)
            gap = scores[hi] - scores[lo]
            if gap == 0:
                out.ties += 1
            elif gap < min_gap:
                out.small_gap += 1
            else:
                kept.append((-gap, hi, lo))
    kept.sort()
    if max_pairs and len(kept) > max_pairs:
        out.over_cap = len(kept) - max_pairs
        kept = kept[:max_pairs]
    out.pairs = [(hi, lo) for _, hi, lo in kept]
    return out
