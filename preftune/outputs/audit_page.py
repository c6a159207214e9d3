"""The audit report rendered: terminal text (`format_audit`), its figure (length and margin histograms), and the
self-contained HTML page: readable at 1280 px and on a 390 px phone without scrolling the page sideways (wide tables
scroll in their own box), the data's paths once at the top, numbers formatted, examples as prompt / chosen /
rejected blocks with their real line breaks and the token pieces on each side of the prompt/answer boundary.
Unpaired (KTO) data gets its own page in the same style (`write_unpaired_files`): label counts, lengths per label,
warnings, examples."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.data.examples import format_example
from preftune.errors import PreftuneError
from preftune.outputs.files import write_output


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
    note = report.get("limits", {}).get("note")
    if note:
        add(note)
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
    lines.extend(format_gaps(report.get("gaps")))
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
    shown = report.get("examples", [])[:report.get("show", len(report.get("examples", [])))]
    for i, ex in enumerate(shown, start=1):
        lines.extend(format_example(ex, f"example {i} as training sees it"))
    if report["warnings"]:
        add("warnings:")
        for w in report["warnings"]:
            add(f"  ! {w}")
    else:
        add("no warnings")
    return "\n".join(lines)


def _bin_label(edges: list[float], i: int) -> str:
    lo, hi = edges[i], edges[i + 1]
    if hi - lo == 1 and (lo + 0.5).is_integer():  # one bin per integer value (`histogram`): the value itself
        return f"{lo + 0.5:g}"
    return f"{lo:.3g} .. {hi:.3g}"


def format_gaps(g: dict | None, width: int = 40) -> list[str]:
    """The judge's scores of a `preftune pairs` file: gap quantiles, a text histogram, the length share and the
    pairs with the smallest gaps (nothing for other data)."""
    if not g:
        return []
    judges = ", ".join(g["judges"]) or "not recorded"
    lines = [f"judge's scores (gap = score chosen - score rejected; judge {judges}): {g['pairs']:,} scored pairs",
             f"  gap: {_fmt_stats(g['gap'])}"]
    counts, edges = g["histogram"]["counts"], g["histogram"]["edges"]
    labels = [_bin_label(edges, i) for i in range(len(counts))]
    pad, top = max(map(len, labels), default=0), max(counts, default=0)
    for label, count in zip(labels, counts):
        bar = "#" * (round(width * count / top) if top else 0)
        lines.append(f"    {label:>{pad}} | {bar} {count:,}")
    among = g["chosen_longer_among_unequal"]
    lines.append(f"  chosen is the longer answer ({g['length_unit']}) in {100 * g['chosen_longer']:.1f}% of pairs"
                 + (f", {100 * among:.1f}% of the {g['pairs_with_unequal_lengths']:,} whose lengths differ"
                    if among is not None else ""))
    lines.append(f"  smallest gaps (the weakest signal for DPO; first {len(g['smallest'])}):")
    for item in g["smallest"]:
        lines.append(f"    {item['gap']:>7g}  {item['where']}: chosen {item['chosen']!r} | rejected {item['rejected']!r}")
    return lines


def _panels(report: dict) -> list[tuple[str, dict]]:
    hists = report["lengths"]["histograms"]
    panels = [(f"{part} length ({report['lengths']['unit']})", hists[part]) for part in ("prompt", "chosen", "rejected")]
    m = report.get("model")
    if m and m.get("scored"):
        panels.append(("margin log p(chosen) - log p(rejected)", m["histogram"]))
    if report.get("gaps"):
        panels.append(("judge's gap (score chosen - score rejected)", report["gaps"]["histogram"]))
    return panels


def _figure_png(panels: list[tuple[str, dict]], columns: int | None = None, counted: str = "pairs") -> bytes:
    """The histograms side by side (`columns` per row; all in one row by default) as one PNG; `counted`: what
    the y axis counts."""
    # The object-oriented API with an explicit Agg canvas: no pyplot, so no global backend is switched for
    # the process that imports us (a notebook keeps its own backend).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = columns or len(panels)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.5 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, hist) in enumerate(panels, start=1):
        ax = fig.add_subplot(rows, cols, i)
        if hist["counts"]:
            ax.stairs(hist["counts"], hist["edges"], fill=True, alpha=0.7)
        if title.startswith("margin"):
            ax.axvline(0.0, color="black", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(counted, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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
    # each file whole and never through a link (outputs/files.py); a full disk is one sentence
    write_output(output_json, json.dumps(report, indent=2, ensure_ascii=False) + "\n", "the audit")
    for extra in extras:
        if extra.suffix.lower() == ".png":
            write_output(extra, _figure_png(_panels(report)), "the audit figure")
        else:
            pngs = [(title, _figure_png([(title, hist)])) for title, hist in _panels(report)]
            write_output(extra, audit_html(report, pngs, text), "the audit page")


# ---------------------------------------------------------------------------------------------- the HTML page

_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4;"
    "overflow-wrap:anywhere}"
    "h1{font-size:1.5em;overflow-wrap:anywhere}h2{font-size:1.2em;margin-top:1.6em}"
    ".paths,.where{color:#555;font-size:.9em;overflow-wrap:anywhere}"
    ".box{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
    "li{overflow-wrap:anywhere}.bad{color:#a00}"
    ".figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,240px),1fr));gap:.8em}"
    ".figs img{width:100%;height:auto}"
    ".ex{border:1px solid #ddd;border-radius:4px;margin:1em 0;padding:.3em .8em .8em}.ex h3{font-size:1em}"
    ".label{font-size:.8em;color:#555;margin-top:.6em;text-transform:uppercase;letter-spacing:.05em}"
    ".text{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:.4em .6em;font-family:monospace;"
    "font-size:.9em;margin:.2em 0}.text.chosen{background:#eef7ee}.text.rejected{background:#fbeeee}"
    ".tok{display:inline-block;background:#e8eefc;border:1px solid #c5d0ee;border-radius:3px;padding:0 3px;"
    "margin:1px;font-family:monospace;font-size:.85em;white-space:pre;max-width:100%;overflow:hidden}"
    ".cut{display:inline-block;color:#c60;font-weight:bold;margin:0 .4em}"
    "pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f6f6;padding:1em}"
)


def _n(x: Any) -> str:
    """A number as a person reads it: 6,273 / 6,273.18 / 0.0123 / 1.2e-05."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x)
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:,.2f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _shorten(text: str, sources: list[str]) -> str:
    """`text` with the data's paths left out (they are shown once at the top): "line 7", or "b.jsonl line 7"."""
    for src in sorted(sources, key=len, reverse=True):
        text = text.replace(f"{src} ", "" if len(sources) == 1 else f"{Path(src).name} ").replace(src, Path(src).name)
    return text


def _named(text: str, sources: list[str]) -> str:
    """`text` with each data path as its file name (a sentence such as "loaded 40 pairs from PATH (...)" keeps
    its object; the full paths are at the top)."""
    for src in sorted(sources, key=len, reverse=True):
        text = text.replace(src, Path(src).name)
    return text


def _rows(items: list[tuple[str, Any]]) -> str:
    esc = html.escape
    return "".join(f"<tr><th>{esc(k)}</th><td class='n'>{esc(v if isinstance(v, str) else _n(v))}</td></tr>"
                   for k, v in items)


def _overview(report: dict) -> str:
    n, dup, pr = report["pairs"], report["duplicates"], report["prompts"]
    tr, lb = report["truncation"], report["length_bias"]
    items = [("rows read", report["rows_read"]), ("valid pairs", n), ("invalid rows", report["invalid"]["count"]),
             ("pairs with nothing to train on", report.get("skipped", {}).get("count", 0)),
             ("format", report["format"] + (", " + report["layout"] if report["layout"] != "fields" else "")),
             ("exact duplicates", dup["exact"]), ("near duplicates", dup["near"]),
             ("distinct prompts", pr["distinct"]), ("pairs per prompt", pr["mean_pairs_per_prompt"]),
             (f"prompts truncated ({tr['unit']})", share_text(tr["prompt_truncated"], n)),
             (f"answers truncated ({tr['unit']})", share_text(tr["completion_truncated"], n))]
    if lb.get("pairs"):
        items.append(("chosen longer / shorter", f"{_pct(lb['chosen_longer'])} / {_pct(lb['chosen_shorter'])}"))
    m = report.get("model")
    if m and m.get("scored"):
        items += [("model prefers chosen (summed)", _pct(m["prefers_chosen"])),
                  ("model prefers chosen (per token)", _pct(m["prefers_chosen_per_token"]))]
    return f"<div class='box'><table>{_rows(items)}</table></div>"


def _lengths_table(report: dict) -> str:
    ln, keys = report["lengths"], ("count", "min", "median", "p95", "max", "mean")
    head = "<tr><th></th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    body = "".join(f"<tr><th>{part}</th>" + "".join(f"<td class='n'>{_n(ln[part].get(k))}</td>" for k in keys)
                   + "</tr>" for part in ("prompt", "chosen", "rejected"))
    return f"<div class='box'><table>{head}{body}</table></div>"


def _margins(report: dict) -> str:
    m, esc, src = report.get("model"), html.escape, report["sources"]
    if not (m and m.get("scored")):
        return ""
    head = "<tr><th>margin<br>(per token)</th><th>prefers</th><th>pair</th></tr>"
    body = "".join(
        f"<tr><td class='n'>{_n(it['margin'])}<br>({_n(it['margin_per_token'])})</td>"
        f"<td>{esc(it['verdict'].removeprefix('prefers '))}</td>"
        f"<td><div class='where'>{esc(_shorten(it['where'], src))}</div>"
        f"<b>prompt</b> {esc(it['prompt'])}<br><b>chosen</b> {esc(it['chosen'])}<br>"
        f"<b>rejected</b> {esc(it['rejected'])}</td></tr>" for it in m["largest"])
    return (f"<h2>Model preference ({_n(m['scored'])} pairs)</h2><p>margin log p(chosen) - log p(rejected): median "
            f"{_n(m['margin'].get('median'))}, mean {_n(m['margin'].get('mean'))}.</p><h3>Largest |margin|</h3>"
            f"<div class='box'><table>{head}{body}</table></div>")


def _gaps(report: dict) -> str:
    """The judge's scores of a `preftune pairs` file: the smallest-gap pairs (the histogram is a figure above)."""
    g, esc, src = report.get("gaps"), html.escape, report["sources"]
    if not g:
        return ""
    head = "<tr><th>gap<br>(chosen, rejected)</th><th>pair</th></tr>"
    body = "".join(
        f"<tr><td class='n'>{_n(it['gap'])}<br>({_n(it['score_chosen'])}, {_n(it['score_rejected'])})</td>"
        f"<td><div class='where'>{esc(_shorten(it['where'], src))}</div>"
        f"<b>prompt</b> {esc(it['prompt'])}<br><b>chosen</b> {esc(it['chosen'])}<br>"
        f"<b>rejected</b> {esc(it['rejected'])}</td></tr>" for it in g["smallest"])
    return (f"<h2>Judge's scores ({_n(g['pairs'])} scored pairs)</h2><p>gap median {_n(g['gap'].get('median'))}, "
            f"mean {_n(g['gap'].get('mean'))}; chosen is the longer answer ({esc(g['length_unit'])}) in "
            f"{_pct(g['chosen_longer'])} of pairs.</p><h3>Smallest gaps</h3>"
            f"<div class='box'><table>{head}{body}</table></div>")


def _tokens(pieces: list[str]) -> str:
    return "".join(f"<span class='tok'>{html.escape(p)}</span>" for p in pieces)


def _example(i: int, ex: dict, sources: list[str]) -> str:
    esc = html.escape
    sides = [s for s in ("chosen", "rejected", "completion") if s in ex]
    out = [f"<div class='ex'><h3>Example {i} <span class='where'>({esc(_shorten(ex['where'], sources))})</span></h3>"]
    for part in ("prompt", *sides):
        out.append(f"<div class='label'>{part}</div><div class='text {part}'>{esc(ex[part])}</div>")
    tok = ex.get("tokens") or {}
    if "dropped" in tok:
        out.append(f"<p class='bad'>dropped by tokenization: {esc(tok['dropped'])}</p>")
    elif tok:
        out.append(f"<div class='label'>tokens at the boundary (prompt {_n(tok['prompt'])} tokens)</div>")
        for s in sides:
            more = "… " if tok["prompt"] > len(tok["prompt_end"]) else ""
            out.append(f"<div>{more}{_tokens(tok['prompt_end'])}<span class='cut'>| {s}</span>"
                       f"{_tokens(tok[f'{s}_start'])}</div>")
        for s in sides:
            out.append(f"<div class='label'>end of {s} ({_n(tok[s])} tokens, EOS {esc(tok[f'{s}_eos'])})</div>"
                       f"<div>{_tokens(tok[f'{s}_end'])}</div>")
    if "note" in ex:
        out.append(f"<p class='where'>{esc(ex['note'])}</p>")
    return "".join(out) + "</div>"


def _figs(pngs: list[tuple[str, bytes]]) -> str:
    return "".join(f"<img alt='{html.escape(title)}' src='data:image/png;base64,"
                   f"{base64.b64encode(png).decode('ascii')}'>" for title, png in pngs)


def _warnings(report: dict) -> str:
    src = report["sources"]
    return "".join(f"<li>{html.escape(_shorten(w, src))}</li>" for w in report["warnings"]) or "<li>none</li>"


def _page(title: str, heading: str, report: dict, sections: list[str], text: str) -> str:
    """An audit page around its `sections`: the head, the data's paths once, the summary line, the examples as
    training sees them, the full text folded at the end."""
    esc, src = html.escape, report["sources"]
    body = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{title}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{heading}</h1>",
        "<p class='paths'>" + "<br>".join(esc(s) for s in src) + "</p>",
        f"<p>{esc(_named(report['summary'], src))}</p>",
        *sections,
    ]
    if report.get("examples"):
        body.append("<h2>Examples as training sees them</h2>")
        body += [_example(i, ex, src) for i, ex in enumerate(report["examples"], start=1)]
    body.append(f"<details><summary>Full report (text)</summary><pre>{esc(text)}</pre></details></body></html>")
    return "\n".join(body)


def audit_html(report: dict, pngs: list[tuple[str, bytes]], text: str) -> str:
    """The self-contained page: overview, warnings, histograms, lengths, model margins, examples, full text."""
    esc = html.escape
    tr, note = report["truncation"], report.get("limits", {}).get("note")
    return _page("preftune data audit", "Data audit", report, [
        f"<h2>Overview</h2>{_overview(report)}",
        f"<h2>Warnings</h2><ul>{_warnings(report)}</ul>",
        f"<h2>Lengths</h2><p>{esc(report['lengths']['note'])}; truncation at max_length {_n(tr['max_length'])} / "
        f"max_prompt_length {_n(tr['max_prompt_length'])}" + (f" ({esc(note)})" if note else "") + ".</p>",
        f"<div class='figs'>{_figs(pngs)}</div>{_lengths_table(report)}",
        _margins(report),
        _gaps(report),
    ], text)


# ---------------------------------------------------------------------------------------------- unpaired data


def _unpaired_panels(report: dict) -> list[tuple[str, dict]]:
    hists, unit = report["lengths"]["histograms"], report["lengths"]["unit"]
    return [(f"prompt length ({unit})", hists["prompt"]),
            (f"desirable completion length ({unit})", hists["desirable"]),
            (f"undesirable completion length ({unit})", hists["undesirable"])]


def unpaired_html(report: dict, pngs: list[tuple[str, bytes]], text: str) -> str:
    """The page of an unpaired audit (audit_unpaired.py): overview, warnings, length histograms and table per
    label, invalid rows, examples with their label, the full text."""
    esc, src = html.escape, report["sources"]
    n = report["examples_count"]
    items = [("examples", n), ("desirable", share_text(report["desirable"], n)),
             ("undesirable", share_text(report["undesirable"], n)), ("invalid rows", len(report["invalid"])),
             ("exact duplicates", report["duplicates"]), ("labelled both ways", report["labelled_both_ways"]),
             ("cut or dropped by the limits", share_text(report["cut_by_limits"], n))]
    ln, keys = report["lengths"], ("count", "min", "median", "p95", "max", "mean")
    head = "<tr><th></th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"
    table = "".join(f"<tr><th>{name}</th>" + "".join(f"<td class='n'>{_n(ln[part].get(k))}</td>" for k in keys)
                    + "</tr>" for name, part in (("prompt", "prompt"), ("desirable completion", "desirable"),
                                                 ("undesirable completion", "undesirable")))
    limits = report["limits"]
    invalid = "".join(f"<li>{esc(_shorten(r, src))}</li>" for r in report["invalid"][:20])
    labelled = {**report, "examples": [
        {**ex, "where": f"{ex['where']}, {'desirable' if ex.get('label') else 'undesirable'}"}
        for ex in report.get("examples") or []]}
    return _page("preftune data audit (unpaired)", "Data audit: unpaired examples", labelled, [
        f"<h2>Overview</h2><div class='box'><table>{_rows(items)}</table></div>",
        f"<h2>Warnings</h2><ul>{_warnings(report)}</ul>",
        f"<h2>Lengths</h2><p>{esc(ln['unit'])}; limits max_length {_n(limits['max_length'])} / max_prompt_length "
        f"{_n(limits['max_prompt_length'])}.</p>",
        f"<div class='figs'>{_figs(pngs)}</div><div class='box'><table>{head}{table}</table></div>",
        f"<h2>Invalid rows</h2><ul>{invalid}</ul>" if invalid else "",
    ], text)


def write_unpaired_files(report: dict, text: str, output_json: Path) -> tuple[Path, Path]:
    """The unpaired audit's JSON, PNG (its length histograms) and HTML page beside it, each written whole and
    never through a link (outputs/files.py). Returns the PNG's and the page's paths."""
    png, page = output_json.with_suffix(".png"), output_json.with_suffix(".html")
    write_output(output_json, json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", "the audit")
    panels = _unpaired_panels(report)
    write_output(png, _figure_png(panels, counted="examples"), "the audit figure")
    pngs = [(title, _figure_png([(title, hist)], counted="examples")) for title, hist in panels]
    write_output(page, unpaired_html(report, pngs, text), "the audit page")
    return png, page
