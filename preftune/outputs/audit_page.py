"""The audit's figure (length and margin histograms) and its self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from preftune.errors import PreftuneError


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
