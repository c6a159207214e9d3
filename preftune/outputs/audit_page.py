"""The audit report rendered: terminal text (`format_audit`), its figure (length and margin histograms) and its
self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from preftune.data.examples import format_example
from preftune.errors import PreftuneError


def share_text(n: int, total: int) -> str:
    """"12 of 40 (30.0%)", for counts a person reads next to their total."""
    return f"{n:,} of {total:,} ({100 * n / total:.1f}%)" if total else f"{n:,}"


def _fmt_stats(d: dict) -> str:
    if not d.get("count"):
        return "-"
    keys = [k for k in d if k not in ("count",)]
    return "  ".join(f"{k} {d[k]:,}" if isinstance(d[k], int) else f"{k} {d[k]:.3g}" for k in keys)


def format_audit(report: dict) -> str:
    """The report as terminal text: one section per question, warnings last."""
    lines: list[str] = []
    add = lines.append
    n = report["pairs"]
    add(f"data: {', '.join(report['sources'])}")
    add(f"  {report['summary']}")
    add(
        f"  format {report['format']}{' (message lists)' if report['conversational'] else ''}; "
        f"{report['rows_read']:,} rows read, {n:,} valid pairs"
    )
    inv = report["invalid"]
    if inv["count"]:
        add(f"invalid rows: {inv['count']:,}")
        for reason, count in inv["by_reason"].items():
            add(f"  {count:>7,}  {reason}")
        for row in inv["first"]:
            add(f"    {row}")
    dup = report["duplicates"]
    add(
        f"duplicates: {dup['exact']:,} exact, {dup['near']:,} near (case/whitespace), "
        f"{dup['near_identical_pairs']:,} pairs with chosen ~ rejected"
    )
    for text in dup["exact_examples"]:
        add(f"    {text}")
    pr = report["prompts"]
    add(
        f"prompts: {pr['distinct']:,} distinct, {pr['mean_pairs_per_prompt']:.2f} pairs per prompt on average"
    )
    for item in pr["top"]:
        if item["pairs"] > 1:
            add(f"  {item['pairs']:>7,}  {item['prompt']}")
    ln = report["lengths"]
    add(f"lengths ({ln['note']}):")
    for part in ("prompt", "chosen", "rejected"):
        add(f"  {part:<9}{_fmt_stats(ln[part])}")
    tr = report["truncation"]
    add(
        f"truncation at max_length {tr['max_length']:,} / max_prompt_length {tr['max_prompt_length']:,} "
        f"({tr['unit']}): {share_text(tr['prompt_truncated'], n)} prompts truncated, "
        f"{share_text(tr['completion_truncated'], n)} answers truncated, "
        f"{tr['dropped_empty'] + tr.get('dropped_identical', 0):,} pairs dropped"
    )
    lb = report["length_bias"]
    if lb.get("pairs"):
        add(
            f"length bias ({lb['unit']}): chosen longer in {100 * lb['chosen_longer']:.1f}%, shorter in "
            f"{100 * lb['chosen_shorter']:.1f}%, equal in {100 * lb['equal']:.1f}%; mean chosen - rejected "
            f"{lb['mean_difference']:+.2f}"
        )
    m = report.get("model")
    if m and m.get("scored"):
        add(
            f"model preference over {m['scored']:,} pairs: "
            f"prefers chosen in {100 * m['prefers_chosen']:.1f}% "
            f"(summed log-prob), {100 * m['prefers_chosen_per_token']:.1f}% (per token)"
        )
        add(f"  margin log p(chosen) - log p(rejected): {_fmt_stats(m['margin'])}")
        add(f"  per-token margin:                       {_fmt_stats(m['margin_per_token'])}")
        add("  largest |margin|:")
        for item in m["largest"]:
            add(f"    {item['margin']:+9.2f}  {item['verdict']:<16} {item['where']}: {item['prompt'][:50]}")
    for i, ex in enumerate(report.get("examples", []), start=1):
        lines.extend(format_example(ex, f"example {i} as training sees it"))
    if report["warnings"]:
        add("warnings:")
        for w in report["warnings"]:
            add(f"  ! {w}")
    else:
        add("no warnings")
    return "\n".join(lines)


def _figure_png(report: dict) -> bytes:
    # The object-oriented API with an explicit Agg canvas: no pyplot, so no global backend is switched for
    # the process that imports us (a notebook keeps its own backend).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hists = report["lengths"]["histograms"]
    panels = [
        (f"{part} length ({report['lengths']['unit']})", hists[part])
        for part in ("prompt", "chosen", "rejected")
    ]
    m = report.get("model")
    if m and m.get("scored"):
        panels.append(("margin log p(chosen) - log p(rejected)", m["histogram"]))
    fig = Figure(figsize=(4.2 * len(panels), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, hist) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        if hist["counts"]:
            ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.7)
        if title.startswith("margin"):
            ax.axvline(0.0, color="black", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("pairs", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _html(report: dict, png: bytes, text: str) -> str:
    esc = html.escape
    rows = "".join(f"<li>{esc(w)}</li>" for w in report["warnings"]) or "<li>none</li>"
    img = base64.b64encode(png).decode("ascii")
    body = [
        "<!doctype html><html><head><meta charset='utf-8'><title>preftune data audit</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}pre{background:#f6f6f6;padding:1em;"
        "white-space:pre-wrap}</style></head><body>",
        f"<h1>Data audit: {esc(', '.join(report['sources']))}</h1>",
        f"<p>{esc(report['summary'])}</p>",
        f"<h2>Warnings</h2><ul>{rows}</ul>",
        f"<img alt='length and margin histograms' src='data:image/png;base64,{img}'>",
    ]
    ln = report["lengths"]
    table = (
        "<tr><th></th>" + "".join(f"<th>{k}</th>" for k in ("min", "median", "p95", "max", "mean")) + "</tr>"
    )
    for part in ("prompt", "chosen", "rejected"):
        d = ln[part]
        table += (
            f"<tr><th>{part}</th>"
            + "".join(f"<td>{d.get(k, '-')}</td>" for k in ("min", "median", "p95", "max", "mean"))
            + "</tr>"
        )
    body.append(f"<h2>Lengths ({esc(ln['note'])})</h2><table>{table}</table>")
    m = report.get("model")
    if m and m.get("scored"):
        columns = ("margin", "per token", "verdict", "where", "prompt", "chosen", "rejected")
        head = "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
        cells = "".join(
            "<tr>"
            + "".join(
                f"<td>{esc(str(item[k]))}</td>"
                for k in ("margin", "margin_per_token", "verdict", "where", "prompt", "chosen", "rejected")
            )
            + "</tr>"
            for item in m["largest"]
        )
        body.append(f"<h2>Largest margins</h2><table>{head}{cells}</table>")
    body.append(f"<h2>Full report</h2><pre>{esc(text)}</pre></body></html>")
    return "\n".join(body)


def write_audit_files(
    report: dict,
    text: str,
    output_json: str | Path,
    output_html_or_png: str | Path | Sequence[str | Path] | None = None,
) -> None:
    """Write the report as JSON and, optionally, the histograms as a PNG and/or a self-contained HTML page
    (each extra path's suffix picks which: .png or .html/.htm; pass a list for both)."""
    output_json = Path(output_json)
    if output_html_or_png is None:
        extras: list[Path] = []
    elif isinstance(output_html_or_png, (str, Path)):
        extras = [Path(output_html_or_png)]
    else:
        extras = [Path(p) for p in output_html_or_png]
    for extra in extras:
        if extra.suffix.lower() not in (".png", ".html", ".htm"):
            raise PreftuneError(f"cannot write the audit figure to {extra}: use a .png or .html file name")
    try:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        png = _figure_png(report) if extras else b""
        for extra in extras:
            extra.parent.mkdir(parents=True, exist_ok=True)
            if extra.suffix.lower() == ".png":
                extra.write_bytes(png)
            else:
                extra.write_text(_html(report, png, text), encoding="utf-8")
    except OSError as e:
        raise PreftuneError(f"cannot write the audit report: {e}") from None
