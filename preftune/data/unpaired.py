"""Unpaired examples for KTO and APO-zero's unpaired form: one answer per row with a desirable/undesirable label.

Two kinds of file give them (``kind="unpaired"`` in `preftune.data.load`):

* labelled rows, TRL's unpaired preference layout: ``{"prompt": "2+2=", "completion": "4", "label": true}``, or
  with message lists (``"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]``); the
  prompt and completion are read and checked as SFT rows are (every SFT layout works), the label must be a
  boolean (1 and 0 are read as true and false);
* preference pairs, any layout `preftune train` reads: each pair becomes two examples, its chosen answer
  desirable and its rejected answer undesirable (said once in the data summary).

Records: ``{"prompt", "completion", "label": bool}`` (+ ``"tools"``). The paper's rule for imbalanced data is
printed as a suggestion (`balance_line`), and a training file with one kind of label only is refused
(`check_both_labels`): KTO's loss then has nothing to weigh the other kind against.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from preftune.data.detect import VOTERS, detect_layout
from preftune.data.fields import MISSING, PromptTemplate, Skip
from preftune.data.layouts import Layout
from preftune.data.rows import Bad, Rows, type_name
from preftune.data.validate import RowChecker, detect_format
from preftune.errors import PreftuneError

LABEL = "label"


def label_of(obj: dict) -> bool | str:
    """A row's label as a bool, or the reason it is not one (true/false, or 1/0 as JSON and CSV write them)."""
    value = obj.get(LABEL, MISSING) if isinstance(obj, dict) else MISSING
    if value is MISSING:
        return f"missing field '{LABEL}'"
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    shown = repr(value) if isinstance(value, (str, int, float)) else type_name(value)
    return f"field '{LABEL}' is {shown}, expected true or false (or 1 or 0)"


class Labelled:
    """Checks a labelled row as an SFT row (prompt, completion) and adds its label; counts the labels."""

    def __init__(self, inner: RowChecker, notes: Counter[str]):
        self.inner, self.notes = inner, notes

    def __call__(self, obj: dict) -> list[dict | Skip] | str:
        label = label_of(obj)
        if isinstance(label, str):
            return label
        out = self.inner(obj)
        if isinstance(out, str):
            return out
        for record in out:
            if isinstance(record, dict):
                record[LABEL] = label
                self.notes["desirable" if label else "undesirable"] += 1
        return out


class SplitPairs:
    """Checks a preference row and turns each pair into a desirable (chosen) and an undesirable (rejected)
    example; counts the pairs so split."""

    def __init__(self, inner: RowChecker, notes: Counter[str]):
        self.inner, self.notes = inner, notes

    def __call__(self, obj: dict) -> list[dict | Skip] | str:
        out = self.inner(obj)
        if isinstance(out, str):
            return out
        examples: list[dict | Skip] = []
        for record in out:
            if isinstance(record, Skip):
                examples.append(record)
                continue
            extra = {"tools": record["tools"]} if "tools" in record else {}
            examples += [{"prompt": record["prompt"], "completion": record["chosen"], LABEL: True, **extra},
                         {"prompt": record["prompt"], "completion": record["rejected"], LABEL: False, **extra}]
            self.notes["split_pairs"] += 1
            self.notes["desirable"] += 1
            self.notes["undesirable"] += 1
        return examples


def _labelled(rows: Iterable[tuple[int, Any]]) -> bool:
    """Whether a file's first rows carry labels (a vote, like the layout's)."""
    votes: Counter[bool] = Counter()
    for _, obj in rows:
        if isinstance(obj, dict) and not isinstance(obj, Bad):
            votes[LABEL in obj] += 1
            if sum(votes.values()) >= VOTERS:
                break
    return votes[True] >= votes[False] and votes[True] > 0


def unpaired_checker(rows: Rows, names: dict[str, str], template: PromptTemplate | None, where: str,
                     more: Callable[[], Iterable[tuple[int, Any]]] | None, ranked: str, fmt: str,
                     notes: Counter[str]) -> tuple[Layout, str, Callable[[dict], Any]]:
    """(layout, format, row check) of one file read as unpaired examples: labelled rows, or pairs split."""
    if _labelled(rows):
        layout = detect_layout(rows, "sft", names, template, where, more, ranked)
        inner = RowChecker("sft", "sft", layout, notes)  # a message-list row is read as such whatever `fmt` says
        return layout, "unpaired", Labelled(inner, notes)
    layout = detect_layout(rows, "preference", names, template, where, more, ranked)
    shape = detect_format(rows, "preference", layout) if fmt in ("auto", "unpaired") else fmt
    return layout, shape, SplitPairs(RowChecker("preference", shape, layout, notes), notes)


def summary_text(notes: dict[str, int]) -> str:
    """What the data summary adds for unpaired examples: the label counts, and the pairs that were split."""
    text = f" ({notes.get('desirable', 0):,} desirable, {notes.get('undesirable', 0):,} undesirable)"
    if notes.get("split_pairs"):
        text += (f"; each of the {notes['split_pairs']:,} pairs became two examples: its chosen answer desirable, its "
                 "rejected answer undesirable")
    return text


def check_both_labels(notes: dict[str, int], where: str) -> None:
    """One sentence when training data holds only one kind of label."""
    n_d, n_u = notes.get("desirable", 0), notes.get("undesirable", 0)
    if n_d and n_u:
        return
    kind, other = ("desirable", "undesirable (label false)") if n_d else ("undesirable", "desirable (label true)")
    raise PreftuneError(f"{where} holds only {kind} examples; KTO weighs desirable against undesirable answers, so "
                        f"add {other} examples" + (", or train the desirable ones with `preftune sft`" if n_d else ""))


def weight_suggestion(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The ranges the KTO paper suggests for the weights of imbalanced data, or None when the given ones fit.

    The paper asks λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]. Returns ((low, high) for desirable_weight with
    undesirable_weight kept, (low, high) for undesirable_weight with desirable_weight kept): change one of
    them, not both. Paper: Ethayarajh et al. 2024, arXiv:2402.01306, Section 4 ("data imbalance").
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        raise ValueError("weight_suggestion needs at least one desirable and one undesirable example")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    d = undesirable_weight * n_undesirable / n_desirable
    u = desirable_weight * n_desirable / n_undesirable
    return (d, d * 4.0 / 3.0), (u * 3.0 / 4.0, u)


def balance_line(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0) -> str | None:
    """The paper's imbalance rule as a line to print, or None when the weights already fit it."""
    if not (n_desirable and n_undesirable):
        return None
    fits = weight_suggestion(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    if fits is None:
        return None
    (d_lo, d_hi), (u_lo, u_hi) = fits
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    return (f"label balance: {n_desirable:,} desirable vs {n_undesirable:,} undesirable examples give "
            f"desirable_weight·n_D / (undesirable_weight·n_U) = {ratio:.3g}; the KTO paper keeps it in [1, 4/3]: set "
            f"--desirable-weight in [{d_lo:.3g}, {d_hi:.3g}] or --undesirable-weight in [{u_lo:.3g}, {u_hi:.3g}] "
            "(one of them)")
