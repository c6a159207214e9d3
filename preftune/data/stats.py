"""Statistics of tokenized or raw pairs that both training and the audit report (`preftune inspect`)."""

from __future__ import annotations

import json
from collections.abc import Sequence

LENGTH_BIAS_HIGH = 0.65
LENGTH_BIAS_LOW = 0.35


def compact_number(x: float) -> float | int:
    """An integral value as int, else rounded to 4 decimals: for reports a person reads (never for metrics)."""
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2**53 else round(x, 4)


def length_bias(lengths: dict) -> dict:
    c, r = lengths["chosen"], lengths["rejected"]
    n = len(c)
    if not n:
        return {"unit": lengths["unit"], "pairs": 0}
    longer = sum(a > b for a, b in zip(c, r))
    shorter = sum(a < b for a, b in zip(c, r))
    return {
        "unit": lengths["unit"],
        "pairs": n,
        "chosen_longer": compact_number(longer / n),
        "chosen_shorter": compact_number(shorter / n),
        "equal": compact_number((n - longer - shorter) / n),
        "mean_difference": compact_number(sum(a - b for a, b in zip(c, r)) / n),
        # Equal-length pairs teach nothing about length, so the bias is judged among the others.
        "chosen_longer_among_unequal": compact_number(longer / (longer + shorter)) if longer + shorter else None,
    }


def length_bias_warning(bias: dict) -> str | None:
    """A warning when chosen is mostly the longer (or mostly the shorter) answer, else None."""
    share = bias.get("chosen_longer_among_unequal")
    if share is None or LENGTH_BIAS_LOW <= share <= LENGTH_BIAS_HIGH:
        return None
    which = "longer" if share > LENGTH_BIAS_HIGH else "shorter"
    return (f"length bias: where the answers differ in length, chosen is the longer one in {100 * share:.1f}% of "
            f"pairs; DPO may learn to make answers {which} rather than better "
            "(consider length-normalised losses or balancing the data)")


def value_key(value: str | list[dict]) -> str:
    """A hashable, order-stable key of a prompt or answer (a string, or a message list as sorted JSON)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def exact_duplicates(records: Sequence[dict]) -> list[tuple[int, int]]:
    """(index, index of its first copy) for every record that repeats an earlier one exactly: the same prompt
    and the same answers. Such copies weigh one example double."""
    parts = ("prompt", "chosen", "rejected") if records and "chosen" in records[0] else ("prompt", "completion")
    first: dict[tuple[str, ...], int] = {}
    out = []
    for i, rec in enumerate(records):
        key = tuple(value_key(rec[k]) for k in parts)
        if key in first:
            out.append((i, first[key]))
        else:
            first[key] = i
    return out


def duplicates_warning(count: int, noun: str = "pairs") -> str | None:
    """The warning both `train` and `inspect` print for `count` exact duplicates, else None."""
    if not count:
        return None
    return f"{count:,} exact duplicate {noun}: they weigh those examples double; deduplicate them"
