"""Statistics of tokenized or raw pairs that both training and the audit report (`preftune inspect`): length bias,
exact duplicates, and the summaries (quantiles, histograms) of the audit's lengths and margins."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

LENGTH_BIAS_HIGH = 0.65
LENGTH_BIAS_LOW = 0.35
HIST_BINS = 30


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


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default): position q * (n - 1)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def describe(
    values: Sequence[float], quantiles: Sequence[tuple[str, float]] = (("median", 0.5), ("p95", 0.95))
) -> dict:
    """count, min, the named quantiles, max and mean of `values`, rounded for a person to read."""
    if not values:
        return {"count": 0}
    s = sorted(values)
    out = {"count": len(s), "min": compact_number(s[0])}
    out.update({name: compact_number(quantile(s, q)) for name, q in quantiles})
    out["max"] = compact_number(s[-1])
    out["mean"] = compact_number(sum(s) / len(s))
    return out


def histogram(values: Sequence[float], bins: int = HIST_BINS) -> dict:
    """Counts over `bins` equal-width bins from min to max (the last bin includes max); integer values
    spanning fewer than `bins` values get one unit-wide bin each."""
    if not values:
        return {"edges": [], "counts": []}
    lo, hi = float(min(values)), float(max(values))
    if all(float(v).is_integer() for v in values) and hi - lo < bins:
        # integer lengths: one bar per value, centred on it
        counts = [0] * int(hi - lo + 1)
        for v in values:
            counts[int(v - lo)] += 1
        return {"edges": [lo - 0.5 + i for i in range(len(counts) + 1)], "counts": counts}
    if hi == lo:
        return {"edges": [lo - 0.5, hi + 0.5], "counts": [len(values)]}
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return {"edges": [round(lo + i * width, 6) for i in range(bins + 1)], "counts": counts}
