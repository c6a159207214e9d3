"""`preftune report`: non-empty PNGs and an HTML page with every image embedded, from a real run's files;
readable mid-run; the problems it flags (chosen and rejected log-probs falling together first)."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

from preftune.cli import main
from preftune.outputs.report import ReportCallback, find_problems, write_report

pytestmark = pytest.mark.report  # these tests read the report train() writes

PNG = b"\x89PNG\r\n\x1a\n"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("href", "src"):
            if tag != "img" and a.get(key):
                self.links.append(a[key])


def test_report_of_a_run_embeds_every_image(tiny_dpo_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_dpo_run, run)
    (run / "eval.json").write_text(json.dumps({"model": "m", "reference": "r", "beta": 0.1, "preference": {
        "pairs": 3, "accuracy": 2 / 3, "accuracy_ci95": [0.2, 0.9], "margin": {"mean": 0.1},
        "margin_histogram": {"edges": [-1.0, 0.0, 1.0], "counts": [1, 2]}}}))
    assert main(["report", str(run)]) == 0
    assert "report:" in capsys.readouterr().out
    folder = run / "report"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == sorted(["loss.png", "accuracy.png", "margins.png", "chosen_rejected.png", "kl.png", "lr.png",
                           "grad_norm.png", "throughput.png", "eval_margins.png"])
    for p in folder.glob("*.png"):
        assert p.read_bytes().startswith(PNG) and p.stat().st_size > 5000
    page = (folder / "report.html").read_text()
    refs = _Refs()
    refs.feed(page)
    assert len(refs.images) == len(pngs)
    for src in refs.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert refs.links == []  # nothing outside the page
    assert "Held-out evaluation (eval.json)" in page and "none found" in page


def test_report_while_the_run_is_going(tiny_dpo_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = (tiny_dpo_run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:17])  # a line being written
    report = write_report(run)
    page = report.html.read_text()
    assert "in progress or stopped" in page and "last step 6" in page
    assert (run / "report" / "loss.png").stat().st_size > 0


def _rows(chosen: list[float], rejected: list[float]) -> list[dict]:
    return [{"step": i + 1, "split": "train", "loss": 0.5, "logps/chosen": c, "logps/rejected": r,
             "rewards/accuracies": 0.9} for i, (c, r) in enumerate(zip(chosen, rejected))]


def test_both_log_probs_falling_is_flagged():
    falling = _rows([-20 - i for i in range(20)], [-22 - 3 * i for i in range(20)])
    (problem,) = find_problems(falling)
    # first tenth (2 rows): chosen -20.5, rejected -23.5; last tenth: chosen -38.5, rejected -77.5
    assert problem.startswith("chosen and rejected log-probs fell together (chosen -20.50 → -38.50, rejected "
                              "-23.50 → -77.50")
    healthy = _rows([-20 + 0.1 * i for i in range(20)], [-22 - 3 * i for i in range(20)])
    assert find_problems(healthy) == []
    small = _rows([-200 - 0.1 * i for i in range(20)], [-22 - 3 * i for i in range(20)])  # 1.8 nats < 1% of 200
    assert find_problems(small) == []


def test_other_problems():
    rows = _rows([-20.0] * 12, [-25.0] * 12)
    for r in rows:
        r["rewards/accuracies"] = 0.4
    rows[3]["loss"] = None
    rows[-1]["skipped_steps"] = 2
    rows += [{"step": s, "split": "eval", "loss": v} for s, v in ((4, 0.5), (8, 0.4), (12, 0.6))]
    for i, r in enumerate(rows[:12]):
        r["loss"] = None if i == 3 else 0.7 - 0.05 * i
    problems = find_problems(rows)
    assert [p.split(" ")[0] for p in problems] == ["non-finite", "2", "the", "the"]
    assert "stayed at or below chance" in problems[2] and "eval loss rose from 0.4000 at step 8" in problems[3]


def test_report_callback_on_train_end(tiny_dpo_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_dpo_run, run)
    state = SimpleNamespace(is_main_process=True, output_dir=run, interrupted=False, final_dir=run / "final")
    ReportCallback().on_train_end(state)
    assert (run / "report" / "report.html").is_file()
    ReportCallback().on_train_end(SimpleNamespace(is_main_process=True, output_dir=tmp_path / "nothing"))
    assert "the run report was not written" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["report", "/nonexistent/run"]])
def test_report_bad_folder_is_one_sentence(args, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1
