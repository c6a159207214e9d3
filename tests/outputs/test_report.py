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
from preftune.outputs.report import ReportCallback, find_problems, render_html, run_metric_rows, write_report

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
    shutil.copy(tiny_dpo_run / ".preftune-run.json", run)  # a running run's folder carries its mark
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


def test_values_from_files_are_escaped_odd_lines_left_out_and_links_refused(tiny_dpo_run, tmp_path):
    """A <script> as a step, as a metric's name and in eval.json never reaches the page as a tag; the lines that
    are not metrics rows (a list, no step, a text step, a bool step, a bare string: 5; a non-UTF-8 value in a
    real row stays) are counted as one problem; an odd eval.json and a YAML alias bomb as config.yaml draw
    nothing from them and raise nothing; a link planted at RUN/report is refused and its target untouched; a
    run without evaluations has no eval column."""
    from preftune.errors import PreftuneError

    run = tmp_path / "run"
    shutil.copytree(tiny_dpo_run, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": "<script>alert(1)</script>", "split": "train", "loss": 1}\n[1, 2]\n'
                b'{"split": "train", "loss": 1}\n{"step": true, "split": "train"}\n"text"\n'
                b'{"step": 25, "split": "train", "<script>k</script>": 1, "note": "\xff"}\n')
    (run / "eval.json").write_text(json.dumps({"model": "<script>m</script>", "preference": [1], "kl": "x",
                                               "judge": {"ci95": 5}, "side_by_side": [1, {"prompt": None}]}))
    (run / "config.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{k}: &{k} [{', '.join(['*' + p] * 10)}]\n" for p, k in zip("abcdef", "bcdefg")) + "model: *g\n")
    report = write_report(run)
    page = report.html.read_text()
    assert "<script>" not in page and "&lt;script&gt;k&lt;/script&gt;" in page and "&lt;script&gt;m" in page
    assert report.problems[-1].startswith("5 line(s) of metrics.jsonl are not metrics rows")
    assert "<th>train (step 25)</th><th>eval (step 24)</th>" in page
    train_rows = [r for r in run_metric_rows(run) if r["split"] == "train"]
    page = render_html(run, train_rows, {}, [], [], None)
    assert "<th>train (step 25)</th></tr>" in page and "eval (step" not in page
    target = tmp_path / "elsewhere"
    target.mkdir()
    shutil.rmtree(run / "report")
    (run / "report").symlink_to(target)
    with pytest.raises(PreftuneError, match="report is a symbolic link"):
        write_report(run)
    assert list(target.iterdir()) == []
    with pytest.raises(PreftuneError, match="run_dir must be a folder path, got int"):
        write_report(5)


def test_the_step_axis_has_whole_number_ticks():
    from preftune.outputs.report import _figure, _step_axis

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([1, 2, 3], [0.5, 0.4, 0.3])
    _step_axis(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
