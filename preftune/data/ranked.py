"""Ranked answers: which pairs a row with more than two answers gives (`--ranked`).

LLaMA-Factory's ranking files list answers best first (``output: [best, second, ...]``) and train on the first two;
Nectar rows give each answer a ``rank`` (1 = best). The rule says which pairs (better, worse) to train on:

* ``best-vs-next`` (default, LLaMA-Factory's rule): the best answer against the second best, one pair a row;
* ``best-vs-worst``: the best against the worst, one pair a row (the widest margin);
* ``all-pairs``: every answer against every worse one, n(n-1)/2 pairs a row (InstructGPT's reward-model rule,
  Ouyang et al. 2022, §3.5): more pairs, but the rows with many answers weigh more.

Answers of equal rank are a tie: that pair is dropped and counted, never ordered by where it sits in the list.
"""

from __future__ import annotations

from collections.abc import Sequence

from preftune.data.fields import Skip
from preftune.errors import PreftuneError

RANKED_RULES = ("best-vs-next", "best-vs-worst", "all-pairs")


def check_rule(rule: str) -> str:
    if rule not in RANKED_RULES:
        raise PreftuneError(f"unknown ranked rule {rule!r}; use one of {', '.join(RANKED_RULES)}")
    return rule


def rank_pairs(n: int, ranks: Sequence[float] | None, rule: str) -> list[tuple[int, int] | Skip]:
    """(better, worse) index pairs of `n` answers listed best first (`ranks`, when given, in the same order, to find
    ties: a tied pair is a Skip("tie"))."""
    if rule == "best-vs-next":
        pairs = [(0, 1)]
    elif rule == "best-vs-worst":
        pairs = [(0, n - 1)]
    else:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if ranks is None:
        return list(pairs)
    return [Skip("tie") if ranks[i] == ranks[j] else (i, j) for i, j in pairs]
