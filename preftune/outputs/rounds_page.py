"""The report page of a `preftune iterate` folder (`preftune report OUT`, and written by iterate at its end): its
table of rounds as iterate printed it (rounds.json's cells) and a link to each round's own training report."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

from preftune.outputs.files import write_output


def write_rounds_page(run: Path, out: Path, rounds: dict, put: Callable[[Path, bytes], None] | None = None) -> Path:
    """The page of a `preftune iterate` folder: its table of rounds (rounds.json's cells, as iterate printed
    them) and a link to each round's own training report, written to `out`/report.html by `put` (report.py: the
    folder's own report/ like every run file) or as a command's output file."""
    esc = html.escape
    table = rounds.get("table") if isinstance(rounds.get("table"), dict) else {}
    columns, rows = (v if isinstance(v, list) else [] for v in (table.get("columns"), table.get("rows")))
    head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (r if isinstance(r, list) else [r])) + "</tr>"
                   for r in rows)
    links = "".join(f"<li><a href='../{p.parent.parent.parent.name}/train/report/report.html'>"
                    f"{esc(p.parent.parent.parent.name)}</a></li>"
                    for p in sorted(run.glob("round-*/train/report/report.html")))
    stopped = f"<p class='bad'>stopped: {esc(str(rounds['stopped']))}</p>" if rounds.get("stopped") else ""
    detail = rounds.get("rounds") if isinstance(rounds.get("rounds"), list) else []
    stopped += "".join(f"<p class='bad'>note: round {esc(str(r.get('round')))}: {esc(str(r['note']))}</p>"
                       for r in detail if isinstance(r, dict) and r.get("note"))
    page = ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, "
            "initial-scale=1'><title>preftune iterate report</title><style>body{font-family:sans-serif;"
            "max-width:1300px;margin:2em auto;padding:0 1em;color:#222;overflow-wrap:anywhere}.wide{overflow-x:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;"
            "white-space:nowrap}.bad{color:#a00}</style></head><body>"
            f"<h1>Rounds of preftune iterate: {esc(str(run))}</h1><p>result: {esc(str(rounds.get('result')))}</p>"
            f"{stopped}<div class='wide'><table><tr>{head}</tr>{body}</table></div><h2>Each round's training report</h2>"
            f"<ul>{links or '<li>none yet</li>'}</ul></body></html>")
    if put is None:
        return write_output(out / "report.html", page, "the report", "--output-dir")
    put(out / "report.html", page.encode("utf-8"))
    return out / "report.html"
