"""`preftune report RUN_DIR`: the run's curves as PNGs and one self-contained HTML page (images embedded).

Reads only files the run writes (metrics.jsonl, config.yaml, data_summary.txt, eval.json), so it works
while a run is going (a half-written last line is skipped) and on a finished or stopped one. Writes
RUN_DIR/report/report.html and one PNG per figure beside it, each replaced atomically.

    from preftune.outputs.report import write_report
    report = write_report("runs/dpo")     # Report(html=..., pngs=[...], problems=[...])

It also flags what the curves say went wrong; the first is the one to know about in DPO:
- chosen and rejected log-probs falling together: the loss only needs the margin between them to grow, and
  it can grow while both answers lose probability to text in neither set (likelihood displacement: Pal et al.
  2024, "Smaug"/DPOP; Razin et al. 2024). Flagged when, between the first and the last tenth of the logged
  steps, the mean chosen log-prob fell by more than 1 nat and 1% of its size, and the rejected one fell too;
- non-finite values, skipped steps, a reward accuracy that stayed at or below chance, an eval loss rising
  from its minimum while the training loss went on falling.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.callbacks import Callback
from preftune.config import read_yaml
from preftune.errors import PreftuneError
from preftune.outputs.files import write_output
from preftune.outputs.metrics import metric_rows
from preftune.outputs.rounds_page import write_rounds_page
from preftune.outputs.run_dir import RunDir

# (file stem, title, [(metric key, label)], y label): one figure each, drawn when the run logged any key.
FIGURES = (
    ("loss", "Loss", [("loss", "loss")], "loss"),
    ("accuracy", "Reward accuracy", [("rewards/accuracies", "accuracy")], "share of pairs ranked right"),
    ("margins", "Reward margin", [("rewards/margins", "margin")], "reward(chosen) - reward(rejected)"),
    ("kl", "log π − log π_ref on the chosen answers (logged as kl)", [("kl", "kl")], "nats per token"),
    ("lr", "Learning rate", [("lr", "lr")], "learning rate"),
    ("grad_norm", "Gradient norm (before clipping)", [("grad_norm", "grad norm")], "norm"),
    ("throughput", "Throughput", [("pairs_per_s", "pairs/s"), ("tokens_per_s", "tokens/s")], "per second"),
)
DISPLACEMENT_NATS = 1.0
DISPLACEMENT_SHARE = 0.01


@dataclass
class Report:
    html: Path
    pngs: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def run_metric_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run folder's metrics.jsonl rows, read as a report reads them (outputs/metrics.py: metric_rows)."""
    return _read_rows(Path(run_dir))[0]


def _read_rows(run: Path) -> tuple[list[dict[str, Any]], int]:
    if not (run / "metrics.jsonl").is_file():
        raise PreftuneError(f"{run} has no metrics.jsonl; pass a run folder (the output_dir of a training run).")
    return metric_rows(run / "metrics.jsonl")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows: list[dict], split: str, key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and _number(r.get(key))]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def _ends(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def likelihood_displacement(rows: list[dict[str, Any]]) -> tuple[float, float, float, float] | None:
    """(chosen, chosen, rejected, rejected) mean log-probs of the first and last tenth of the logged training steps
    when both fell, the chosen one by more than DISPLACEMENT_NATS and DISPLACEMENT_SHARE of its size (see the
    module docstring); None otherwise. `preftune iterate`'s collapse check reads the same rule."""
    _, chosen = _series(rows, "train", "logps/chosen")
    _, rejected = _series(rows, "train", "logps/rejected")
    if len(chosen) < 2 or len(rejected) != len(chosen):
        return None
    (c0, c1), (r0, r1) = _ends(chosen), _ends(rejected)
    fell = c0 - c1 > max(DISPLACEMENT_NATS, DISPLACEMENT_SHARE * abs(c0)) and r1 < r0
    return (c0, c1, r0, r1) if fell else None


def find_problems(rows: list[dict[str, Any]]) -> list[str]:
    """Sentences naming what went wrong in the logged metrics (see the module docstring)."""
    problems = []
    if (fell := likelihood_displacement(rows)) is not None:
        c0, c1, r0, r1 = fell
        problems.append(
            f"chosen and rejected log-probs fell together (chosen {c0:.2f} → {c1:.2f}, rejected {r0:.2f} → "
            f"{r1:.2f} nats per answer, first vs last tenth of the run): the margin grew by pushing both "
            "answers down, so probability went to text in neither set, a known DPO failure (likelihood "
            "displacement); a larger beta, a lower learning rate, an SFT term (sft_weight) or DPOP "
            "(loss dpop) keep the chosen answers likely.")
    bad = sorted({r["step"] for r in rows for k, v in r.items() if v is None and k not in ("step", "split")})
    if bad:
        problems.append(f"non-finite values were logged at step{'s' if len(bad) > 1 else ''} "
                        f"{', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}.")
    skipped = max((r["skipped_steps"] for r in rows if _number(r.get("skipped_steps"))), default=0)
    if skipped:
        problems.append(f"{skipped} optimizer step(s) were skipped for a non-finite loss or gradient.")
    _, acc = _series(rows, "train", "rewards/accuracies")
    if len(acc) >= 10 and _ends(acc)[1] <= 0.5:
        problems.append(f"the training reward accuracy stayed at or below chance ({_ends(acc)[1]:.1%} over the "
                        "last tenth of the run): the model is not learning the preference.")
    steps, eval_loss = _series(rows, "eval", "loss")
    _, train_loss = _series(rows, "train", "loss")
    if len(eval_loss) >= 3 and len(train_loss) >= 2:
        best = min(range(len(eval_loss)), key=eval_loss.__getitem__)
        last = eval_loss[-1]
        if best < len(eval_loss) - 1 and last > eval_loss[best] + 0.05 * abs(eval_loss[best]) and \
                _ends(train_loss)[1] < _ends(train_loss)[0]:
            problems.append(f"the eval loss rose from {eval_loss[best]:.4f} at step {steps[best]} to {last:.4f} at "
                            f"step {steps[-1]} while the training loss kept falling: overfitting; the checkpoint "
                            f"near step {steps[best]} may be the better model.")
    return problems


def _figure():
    # The object-oriented API with an explicit Agg canvas: no pyplot, so no global backend is switched for
    # the process that imports us (a notebook keeps its own backend).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _step_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator  # (matplotlib loads only when a report is drawn)

    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no tick at 2.5


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _draw(ax, rows: list[dict], key: str, label: str, color: str | None = None) -> bool:
    x, y = _series(rows, "train", key)
    ex, ey = _series(rows, "eval", key)
    if not x and not ex:
        return False
    if x:
        (line,) = ax.plot(x, y, color=color, linewidth=1.2, marker="." if len(x) <= 30 else None,
                          label=f"train {label}")
        color = line.get_color()
    if ex:
        ax.plot(ex, ey, linestyle="none", marker="o", markersize=6, markerfacecolor="white", color=color,
                label=f"eval {label}")
    return True


def _metric_figure(rows: list[dict], title: str, keys: list[tuple[str, str]], ylabel: str) -> bytes | None:
    fig = _figure()
    axes = [fig.add_subplot(1, len(keys), i + 1) for i in range(len(keys))]
    drawn = False
    for ax, (key, label) in zip(axes, keys):
        if _draw(ax, rows, key, label):
            drawn = True
            _step_axis(ax)
            ax.set_ylabel(ylabel if len(keys) == 1 else label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if key == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if not drawn:
        return None
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def _chosen_rejected_figure(rows: list[dict], flagged: bool) -> bytes | None:
    """Rewards and log-probs of both answers side by side: the failure shows as both log-prob lines falling."""
    panels = [("rewards", "reward β·log(π/π_ref)"), ("logps", "log-prob (nats per answer)")]
    if not any(_series(rows, s, f"{p}/chosen")[0] for p, _ in panels for s in ("train", "eval")):
        return None
    fig = _figure()
    fig.set_size_inches(9.6, 3.6)
    for i, (prefix, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for side, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
            _draw(ax, rows, f"{prefix}/{side}", side, color)
        _step_axis(ax)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    title = "Chosen vs rejected"
    if flagged:
        title += "  —  both log-probs fell (see problems)"
    fig.suptitle(title, fontsize=11, color="darkred" if flagged else "black")
    return _png(fig)


def _margin_histogram(eval_result: dict) -> bytes | None:
    hist = _get(eval_result, "preference", "margin_histogram")
    counts, edges = (hist.get("counts"), hist.get("edges")) if isinstance(hist, dict) else (None, None)
    if not (isinstance(counts, list) and isinstance(edges, list) and counts and len(edges) == len(counts) + 1
            and all(_number(x) and math.isfinite(x) for x in counts + edges)):
        return None  # none, or not one eval.json's histogram: no figure
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("reward margin on held-out pairs (right of 0: ranked right)")
    ax.set_ylabel("pairs")
    ax.set_title("preftune eval: distribution of the implicit-reward margins", fontsize=10)
    return _png(fig)


def _read_json(path: Path) -> dict | None:
    try:
        with path.open("rb") as f:
            value = json.loads(f.read(MAX_JSON).decode("utf-8", errors="replace"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


MAX_JSON = 64 << 20  # eval.json with every side-by-side answer is a few MB


def _read_config(run: Path) -> dict:
    """config.yaml's values, read with the bounds of any config (a YAML alias bomb is refused); {} when
    unreadable."""
    try:
        cfg = read_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
    except PreftuneError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _read_text(path: Path, limit: int = 200_000) -> str:
    try:
        with path.open("rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def write_report(run_dir: str | Path, output_dir: str | Path | None = None) -> Report:
    """Write the PNGs and report.html of the run in `run_dir` into `output_dir` (default RUN_DIR/report, written
    like every run file: only in a folder preftune made, atomically, never through a link)."""
    for name, value in (("run_dir", run_dir), ("output_dir", output_dir)):
        if not isinstance(value, (str, os.PathLike)) and not (name == "output_dir" and value is None):
            raise PreftuneError(f"write_report: {name} must be a folder path, got {type(value).__name__}.")
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise PreftuneError(f"run folder {run} does not exist; pass the output_dir of a training run.")
    rounds = _read_json(run / "rounds.json") if not (run / "metrics.jsonl").is_file() else None
    out, put = _destination(run, output_dir)  # the run's own report/ is refused before anything is drawn
    if rounds is not None:  # a `preftune iterate` folder
        return Report(write_rounds_page(run, out, rounds, put))
    rows, bad = _read_rows(run)
    cfg = _read_config(run)
    eval_result = _read_json(run / "eval.json") if (run / "eval.json").is_file() else None
    problems = find_problems(rows)
    if bad:
        problems.append(f"{bad} line(s) of metrics.jsonl are not metrics rows (an object with a number `step` and "
                        "a `split`) and were left out.")
    figures: list[tuple[str, str, bytes]] = []
    for stem, title, keys, ylabel in FIGURES[:4]:
        png = _metric_figure(rows, title, keys, ylabel)
        if png:
            figures.append((stem, title, png))
    png = _chosen_rejected_figure(rows, any(p.startswith("chosen and rejected") for p in problems))
    if png:
        figures.append(("chosen_rejected", "Chosen vs rejected rewards and log-probs", png))
    for stem, title, keys, ylabel in FIGURES[4:]:
        png = _metric_figure(rows, title, keys, ylabel)
        if png:
            figures.append((stem, title, png))
    if eval_result and (png := _margin_histogram(eval_result)):
        figures.append(("eval_margins", "Held-out reward margins (preftune eval)", png))
    pngs = []
    for stem, _, data in figures:
        pngs.append(out / f"{stem}.png")
        put(pngs[-1], data)
    put(out / "report.html", render_html(run, rows, cfg, problems, figures, eval_result).encode("utf-8"))
    return Report(out / "report.html", pngs, problems)


def _destination(run: Path, output_dir: str | Path | None) -> tuple[Path, Callable[[Path, bytes], None]]:
    """Where the report goes and how each of its files is written: the run's own report/ like every run file
    (only in a folder preftune made, atomically, never through a link), or `output_dir` as a command's output."""
    if output_dir is not None:
        return Path(output_dir).expanduser(), lambda path, data: write_output(path, data, "the report", "--output-dir")
    owner = RunDir.existing(run, "report", "pass --output-dir to write the report elsewhere")
    out = run / "report"
    with owner.saving("report/"):
        if out.exists() and not out.is_dir():
            raise PreftuneError(f"{out} is a file; move it away so that the report folder can be written.")
        out.mkdir(exist_ok=True)
    return out, owner.write_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.6g}"
    return "n/a" if v is None else str(v)


def _table(pairs: list[tuple[str, Any]]) -> str:
    esc = html.escape
    return "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>" for k, v in pairs) + "</table>"


CONFIG_KEYS = ("model", "data", "eval_data", "loss", "beta", "learning_rate", "lr_scheduler", "batch_size",
               "gradient_accumulation_steps", "max_steps", "num_epochs", "lora", "reference", "seed")


def _get(d: Any, *keys: str) -> Any:
    """d[k1][k2]... when each level is a dict, else None (an eval.json may hold anything)."""
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _numbers(v: Any) -> str:
    return ", ".join(_fmt(x) for x in v) if isinstance(v, list) else _fmt(v)


def _eval_section(ev: dict) -> str:
    esc = html.escape
    items: list[tuple[str, Any]] = [("model", ev.get("model")), ("reference", ev.get("reference")),
                                    ("held-out pairs", _get(ev, "preference", "pairs")), ("beta", ev.get("beta")),
                                    ("preference accuracy", _get(ev, "preference", "accuracy")),
                                    ("accuracy 95% CI (Wilson)", _numbers(_get(ev, "preference", "accuracy_ci95"))),
                                    ("mean reward margin", _get(ev, "preference", "margin", "mean"))]
    if "kl" in ev:
        items.append(("KL(model ‖ reference) per token", _get(ev, "kl", "per_token")))
    if "lengths" in ev:
        items += [("answer tokens, model (mean)", _get(ev, "lengths", "model", "tokens_mean")),
                  ("answer tokens, reference (mean)", _get(ev, "lengths", "reference", "tokens_mean"))]
    if "judge" in ev:
        items += [("judge", _get(ev, "judge", "name")), ("win rate", _get(ev, "judge", "win_rate")),
                  ("win rate 95% CI", _numbers(_get(ev, "judge", "ci95")))]
    side = ev.get("side_by_side") if isinstance(ev.get("side_by_side"), list) else []
    rows = "".join(f"<tr><td>{esc(_fmt(_get(r, 'prompt'))[:200])}</td><td>{esc(_fmt(_get(r, 'model')))}</td>"
                   f"<td>{esc(_fmt(_get(r, 'reference')))}</td><td>{esc(_fmt(_get(r, 'verdict')))}</td></tr>"
                   for r in side[:10])
    body = f"<h2>Held-out evaluation (eval.json)</h2>{_table(items)}"
    if rows:
        body += ("<h3>Side by side (first 10)</h3><table><tr><th>prompt</th><th>model</th><th>reference</th>"
                 f"<th>verdict</th></tr>{rows}</table>")
    return body + f"<details><summary>eval.json</summary><pre>{esc(json.dumps(ev, indent=2)[:200_000])}</pre></details>"


def render_html(run: Path, rows: list[dict], cfg: dict, problems: list[str],
                figures: list[tuple[str, str, bytes]], eval_result: dict | None) -> str:
    esc = html.escape
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    last_step = max((r["step"] for r in rows), default=0)  # numbers only (metric_rows)
    finished = (run / "final").is_dir()
    status = (f"finished: final model in {run / 'final'}" if finished else
              "in progress or stopped (no final/ yet): this page shows the metrics logged so far")
    summary = _read_text(run / "data_summary.txt") if (run / "data_summary.txt").is_file() else ""
    probs = "".join(f"<li class='bad'>{esc(p)}</li>" for p in problems) or "<li>none found</li>"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>preftune run report</title>"
        # a phone shows the page at its own width, and a long path in a table cell wraps instead of widening it
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 0.5em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;"
        "vertical-align:top;overflow-wrap:anywhere}h1{overflow-wrap:anywhere}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}.bad{color:#a00}img{width:100%}"
        ".figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{flex:0 1 calc(50% - 0.5em);margin:0}.figs figure.wide{flex-basis:100%}"
        "figcaption{font-size:0.85em;color:#555}@media(max-width:600px){.figs figure{flex-basis:100%}}</style>"
        "</head><body>",
        f"<h1>Run report: {esc(str(run))}</h1>",
        f"<p>{esc(status)}; {len(train)} training and {len(evals)} eval rows, last step {esc(_fmt(last_step))}.</p>",
        f"<h2>Problems</h2><ul>{probs}</ul>",
        "<h2>Curves</h2><p>Lines: training (averaged over each logging window); circles: evaluations.</p>"
        "<div class='figs'>",
    ]
    for stem, title, data in figures:
        img = base64.b64encode(data).decode("ascii")
        wide = " class='wide'" if stem == "chosen_rejected" else ""
        parts.append(f"<figure{wide}><img alt='{esc(title)}' src='data:image/png;base64,{img}'>"
                     f"<figcaption>{esc(title)} ({esc(stem)}.png)</figcaption></figure>")
    parts.append("</div>")
    latest = [(name, rows[-1]) for name, rows in (("train", train), ("eval", evals)) if rows]  # a column each
    keys = [k for k in dict.fromkeys(k for _, r in latest for k in r) if k not in ("split", "step")]
    head = "".join(f"<th>{name} (step {esc(_fmt(r['step']))})</th>" for name, r in latest)
    cells = "".join(f"<tr><th>{esc(str(k))}</th>" + "".join(f"<td>{esc(_fmt(r.get(k, '')))}</td>" for _, r in latest)
                    + "</tr>" for k in keys)
    parts.append(f"<h2>Latest metrics</h2><table><tr><th>metric</th>{head}</tr>{cells}</table>")
    if eval_result:
        parts.append(_eval_section(eval_result))
    parts.append("<h2>Setup</h2>" + _table([(k, cfg[k]) for k in CONFIG_KEYS if k in cfg]))
    if summary:
        parts.append(f"<pre>{esc(summary)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


class ReportCallback(Callback):
    """Training callback: writes RUN/report/ when training ends (also after a stop, from what was logged).

    A failure to draw never fails the finished run.
    """

    def on_train_end(self, state) -> None:
        if not state.is_main_process:
            return
        try:
            report = write_report(state.output_dir)
        except (PreftuneError, OSError, ValueError) as e:
            print(f"preftune: the run report was not written: {e}")
            return
        print(f"report: {report.html}" + (f" ({len(report.problems)} problem(s) flagged)" if report.problems else ""))
