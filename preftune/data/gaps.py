"""The judge's scores in a file of on-policy pairs (`preftune pairs` writes `score_chosen`, `score_rejected`, `gap`
and `source` beside prompt/chosen/rejected), for `preftune inspect`: the gap's distribution and histogram, how
often the chosen answer is the longer one, and the pairs with the smallest gaps (the weakest signal for DPO), each
shown from where its two answers first differ.

The loader keeps only prompt/chosen/rejected, so the scores are read from the same rows again, matched by their
place in the file (`origins`); a file none of whose first rows has a score is not read again. A row's gap is its
`gap`, else `score_chosen − score_rejected`. Lengths are the sampled answers' tokens that `pairs` records in
`source` (`chosen_tokens`, `rejected_tokens`) when every scored row has them, else whitespace words.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from preftune.data.sources import Input, iter_rows
from preftune.data.stats import compact_number, describe, histogram

GAP_BINS = 20  # as `preftune pairs`' own summary
SMALLEST = 10
SNIPPET = 60
QUANTILES = (("p5", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p95", 0.95))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def row_gap(row: dict) -> float | None:
    """The row's gap: `gap`, else score_chosen − score_rejected; None when it has neither."""
    gap = _number(row.get("gap"))
    if gap is not None:
        return gap
    chosen, rejected = _number(row.get("score_chosen")), _number(row.get("score_rejected"))
    return chosen - rejected if chosen is not None and rejected is not None else None


def _scored_rows(sources: Sequence[str], wanted: set[str]) -> Iterator[tuple[str, dict, float]]:
    """(origin, raw row, gap) of the loaded rows that carry a score, file by file."""
    for name in sources:
        path = Path(name).expanduser()
        if not path.is_file():  # a saved or hub dataset: `pairs` writes JSONL files
            continue
        inp = Input(name, path, "file")
        for i, chunk in enumerate(iter_rows(inp, "train")):
            found = [(f"{name} {inp.unit} {number}", obj, row_gap(obj)) for number, obj in chunk
                     if isinstance(obj, dict)]
            if i == 0 and all(gap is None for _, _, gap in found):
                break  # not a file of scored pairs: spare reading the rest
            yield from ((where, obj, gap) for where, obj, gap in found if gap is not None and where in wanted)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return str(value)


def _snippet(value: Any) -> str:
    text = " ".join(_text(value).split())
    return text[:SNIPPET] + ("..." if len(text) > SNIPPET else "")


def _differing(chosen: Any, rejected: Any) -> tuple[str, str]:
    """Snippets of the two answers from a little before where they first differ: pairs with a small gap often
    share a long beginning, and the difference is what a reader needs to see."""
    c, r = (" ".join(_text(v).split()) for v in (chosen, rejected))
    same = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
    start = max(0, same - SNIPPET // 4)
    if start < SNIPPET // 2:
        return _snippet(c), _snippet(r)
    return "..." + _snippet(c[start:]), "..." + _snippet(r[start:])


def _tokens(row: dict) -> tuple[int, int] | None:
    src = row.get("source")
    if not isinstance(src, dict):
        return None
    c, r = src.get("chosen_tokens"), src.get("rejected_tokens")
    ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (c, r))
    return (c, r) if ok else None


def gap_report(records: Sequence[dict], origins: Sequence[str], sources: Sequence[str]) -> dict | None:
    """The scores section of the audit for `records` (loaded from `sources`, at `origins`); None when no row
    carries a score."""
    index = {where: i for i, where in enumerate(origins)}
    scored = list(_scored_rows(sources, set(index)))
    if not scored:
        return None
    gaps = [gap for _, _, gap in scored]
    tokens = [_tokens(obj) for _, obj, _ in scored]
    if all(t is not None for t in tokens):
        unit, lengths = "tokens as sampled", tokens
    else:
        unit = "words"
        lengths = [(len(_text(records[index[w]]["chosen"]).split()), len(_text(records[index[w]]["rejected"]).split()))
                   for w, _, _ in scored]
    longer = sum(c > r for c, r in lengths)
    unequal = sum(c != r for c, r in lengths)
    order = sorted(range(len(scored)), key=lambda j: gaps[j])[:SMALLEST]  # stable: file order among equal gaps
    smallest = []
    for j in order:
        where, obj, gap = scored[j]
        rec = records[index[where]]
        chosen, rejected = _differing(rec["chosen"], rec["rejected"])
        smallest.append({"where": where, "gap": compact_number(gap),
                         "score_chosen": _number(obj.get("score_chosen")),
                         "score_rejected": _number(obj.get("score_rejected")),
                         "prompt": _snippet(rec["prompt"]), "chosen": chosen, "rejected": rejected})
    sources_of = Counter(str(obj["source"].get("judge")) for _, obj, _ in scored
                         if isinstance(obj.get("source"), dict) and "judge" in obj["source"])
    return {
        "pairs": len(scored), "without_score": len(records) - len(scored),
        "gap": describe(gaps, QUANTILES), "histogram": histogram(gaps, bins=GAP_BINS),
        "not_positive": sum(g <= 0 for g in gaps),
        "length_unit": unit, "chosen_longer": compact_number(longer / len(scored)),
        "pairs_with_unequal_lengths": unequal,
        "chosen_longer_among_unequal": compact_number(longer / unequal) if unequal else None,
        "judges": dict(sources_of.most_common()), "smallest": smallest,
    }


def gap_warnings(section: dict | None) -> list[str]:
    """What the scores say is wrong with the file (none for a file `pairs` wrote and nobody edited)."""
    if not section:
        return []
    out = []
    if section["not_positive"]:
        out.append(f"{section['not_positive']:,} pairs have a gap <= 0 (the chosen answer was not scored above the "
                   "rejected one): the file was edited or its sides swapped")
    if section["without_score"]:
        out.append(f"{section['without_score']:,} pairs carry no judge's score beside the {section['pairs']:,} that "
                   "do: the file mixes on-policy pairs with others")
    return out
