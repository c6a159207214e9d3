"""The audit page (`inspect --output`) and the run report page in a real headless browser: at 1280 px and at a phone's
390 px the page itself never scrolls sideways (document.documentElement.scrollWidth <= the viewport). Skipped where
no Chromium is installed (Debian: `apt-get install chromium`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from helpers import make_pairs  # tests/ is on sys.path (conftest.py)

from preftune.audit import audit, write_audit
from preftune.audit_unpaired import audit_unpaired, format_unpaired
from preftune.data.limits import Limits
from preftune.outputs.audit_page import write_unpaired_files
from preftune.outputs.report import write_report

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files"]
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed")


def scroll_widths(pages: dict, widths: tuple[int, ...], tmp_path) -> dict:
    """{(name, width): (scrollWidth, clientWidth)} of each page laid out `width` CSS px wide, from one browser
    start. Headless Chromium keeps its window at least ~500 px wide, so each page sits in an iframe of exactly
    `width` px: its own viewport, as a phone's screen is."""
    frames = "".join(f"<iframe id='{name}@{w}' src='{path.as_uri()}' style='border:0;width:{w}px;height:900px'>"
                     "</iframe>" for name, path in pages.items() for w in widths)
    probe = tmp_path / "probe.html"
    probe.write_text(
        f"<!doctype html><html><head><title>probe</title></head><body style='margin:0'>{frames}<script>"
        "window.addEventListener('load', function () { var out = [];"
        "document.querySelectorAll('iframe').forEach(function (f) { var d = f.contentDocument.documentElement;"
        "out.push(f.id + '=' + d.scrollWidth + ',' + d.clientWidth); }); document.title = out.join(' '); });"
        "</script></body></html>")
    run = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          f"--window-size={max(widths) + 40},1000", "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>([^<]*)</title>", run.stdout).group(1)
    out = {}
    for item in title.split():
        key, size = item.split("=")
        name, width = key.split("@")
        out[name, int(width)] = tuple(map(int, size.split(",")))
    return out


def test_audit_and_report_pages_fit_1280_and_390_px(tmp_path, tiny_model_dir, tiny_dpo_run):
    """The audit page with long unbroken words, a long path, examples and model margins; the unpaired (KTO) audit
    page of the same rows; the run report of the shared tiny run. All three fit 1280 px and 390 px (the audit page's wide tables scroll inside their own box; the
    report's long paths wrap)."""
    from preftune.modeling.load import load_model_and_tokenizer

    rows = make_pairs(24)
    rows[0]["prompt"] = "question: " + "averyverylongwordwithoutanyspaces" * 12 + "\nsecond line answer:"
    data = tmp_path / ("a_rather_long_folder_name_for_a_data_set" * 2) / "prefs.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    write_audit(audit(data, tokenizer=tok, model=model.eval(), show=2), tmp_path / "a.json", tmp_path / "a.html")
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows for k in
                ("chosen", "rejected")]
    kto = data.with_name("kto.jsonl")
    kto.write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    report = audit_unpaired(kto, tokenizer=tok, limits=Limits(64, 32), show=3)
    write_unpaired_files(report, format_unpaired(report, 3), tmp_path / "u.json")
    pages = {"audit": tmp_path / "a.html", "report": write_report(tiny_dpo_run, tmp_path / "report").html,
             "unpaired": tmp_path / "u.html"}
    sizes = scroll_widths(pages, (1280, 390), tmp_path)
    for name in pages:
        assert sizes[name, 1280][0] <= sizes[name, 1280][1], sizes
        assert sizes[name, 390][0] <= sizes[name, 390][1], sizes
        assert sizes[name, 390][1] >= 370, sizes  # the viewport really was a phone's (390 px less a scrollbar)
