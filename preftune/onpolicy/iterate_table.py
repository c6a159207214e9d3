"""The table of rounds of `preftune iterate`: one row per round (round 0 is the first model), built from the
files the round wrote, printed, and written to rounds.json with its cells as text (`table`, which the run's
report page shows as is)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("round", "pairs", "gap median", "steps", "loss", "log p chosen", "log p rejected", "KL→first",
           "KL→start", "score", "good", "win vs first [95%]", "win vs previous [95%]", "status")


def _win(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if not result:
        return None
    return {k: result[k] for k in ("win_rate", "ci95", "wins", "losses", "ties", "n")}


def _train(rows: list[dict[str, Any]]) -> dict[str, Any]:
    train = [r for r in rows if r.get("split") == "train"]
    if not train:
        return {}
    first, last = train[0], train[-1]
    return {"steps": last["step"], "loss": [first.get("loss"), last.get("loss")],
            "logps_chosen": [first.get("logps/chosen"), last.get("logps/chosen")],
            "logps_rejected": [first.get("logps/rejected"), last.get("logps/rejected")],
            "reward_accuracy": last.get("rewards/accuracies")}


def round_row(r: int, model: str, start: str | None, pairs_summary: dict[str, Any] | None,
              train_rows: list[dict[str, Any]], ev: dict[str, Any], timings: dict[str, float] | None) -> dict[str, Any]:
    """Round r's row: its pairs, its training (first and last logged step), its held-out evaluation."""
    row: dict[str, Any] = {"round": r, "model": model, "start": start}
    if pairs_summary:
        row.update(pairs=pairs_summary["pairs"], gap_median=pairs_summary["gap"].get("median"),
                   chosen_longer=pairs_summary["length"]["chosen_longer"])
    row.update(_train(train_rows))
    for name in ("first", "start"):
        row[f"kl_{name}"] = (ev.get(f"kl_{name}") or {}).get("per_token")
    for kind, prefix in (("greedy", ""), ("samples", "sample_")):
        part = ev.get(kind) or {}
        row[f"{prefix}score_mean"], row[f"{prefix}good_share"] = part.get("score_mean"), part.get("good_share")
    row.update(vs_first=_win(ev.get("vs_first")), vs_previous=_win(ev.get("vs_start")),
               samples_vs_previous=_win(ev.get("samples_vs_start")))
    row["status"] = "first model" if r == 0 else "kept"
    if timings:
        row["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return row


def _num(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None:
        return "-"
    text = fmt.format(x)
    # A sampled KL estimate a hair below 0 would print as "-0.000", which reads as a bug: it is 0 at this precision.
    return text[1:] if text.startswith("-") and float(text.replace(",", "").rstrip("%")) == 0 else text


def _span(pair: list | None, fmt: str = "{:.2f}") -> str:
    if not pair or pair[0] is None:
        return "-"
    return f"{fmt.format(pair[0])}→{fmt.format(pair[1])}"


def _rate(w: dict[str, Any] | None) -> str:
    if not w:
        return "-"
    lo, hi = w["ci95"]
    return f"{100 * w['win_rate']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def cells(row: dict[str, Any]) -> list[str]:
    return [str(row["round"]), _num(row.get("pairs"), "{:,}"), _num(row.get("gap_median")),
            _num(row.get("steps"), "{:,}"), _span(row.get("loss"), "{:.3f}"), _span(row.get("logps_chosen"), "{:.1f}"),
            _span(row.get("logps_rejected"), "{:.1f}"), _num(row.get("kl_first"), "{:.3f}"),
            _num(row.get("kl_start"), "{:.3f}"), _num(row.get("score_mean"), "{:.3f}"),
            _num(row.get("good_share"), "{:.1%}"), _rate(row.get("vs_first")), _rate(row.get("vs_previous")),
            row.get("status", "")]


def table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{"columns", "rows"}: every cell as text."""
    return {"columns": list(COLUMNS), "rows": [cells(r) for r in rows]}


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    """The table as aligned lines (a header, then one line per row)."""
    t = table(rows)
    grid = [t["columns"], *t["rows"]]
    widths = [max(len(line[i]) for line in grid) for i in range(len(t["columns"]))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in grid]


def round_line(row: dict[str, Any]) -> str:
    """One round's results in a line, printed as the round ends."""
    good = f" (good {_num(row.get('good_share'), '{:.1%}')})" if row.get("good_share") is not None else ""
    return (f"round {row['round']}: {_num(row.get('pairs'), '{:,}')} pairs, {_num(row.get('steps'), '{:,}')} steps; "
            f"held-out score {_num(row.get('score_mean'), '{:.3f}')}{good}, win vs first {_rate(row.get('vs_first'))}, "
            f"vs previous {_rate(row.get('vs_previous'))}; KL to first {_num(row.get('kl_first'), '{:.3f}')}, to start "
            f"{_num(row.get('kl_start'), '{:.3f}')} nats/token")
