"""`preftune iterate`: rounds of iterative DPO. Each round samples on-policy pairs from its starting model, trains
DPO from that model, and evaluates the result on held-out prompts; the next round starts from it.

    from preftune.onpolicy import IterateConfig, iterate
    result = iterate(IterateConfig(model="runs/sft/final", prompts="prompts.jsonl", judge="my_judges:score",
                                   rounds=3, output_dir="runs/iterate"))
    result.model, result.rounds                  # the kept model; one row per round (round 0 = the first model)

Round r (1..rounds), from the model it starts with (the first model, then the previous round's):

1. pairs: `preftune pairs` on the round's training prompts with the round's model (the sampling seed is
   seed + r - 1, so the rounds draw other answers), judged by the judge opened once for the whole run;
2. train: `preftune train` on those pairs from the round's model, its reference the round's model
   (`reference_mode: round`, iterative DPO) or the first model (`fixed`);
3. evaluate: the held-out prompts answered by the new model, judged (`iterate_eval`): its score, its win rate
   over the first model and over the round's start, its KL to both;
4. decide (`collapse`): a round that collapsed is rolled back (the previous round's model is the result, and the
   run stops) or only reported (`on_collapse: warn`); with `stop_when_no_gain` the run stops after a round
   whose win over the previous round is within noise.

The table of rounds is printed, written to rounds.json and shown in OUT/report/report.html. Files and resume:
`iterate_store`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.errors import PreftuneError
from preftune.onpolicy.collapse import check_round, no_gain, unmoved
from preftune.onpolicy.iterate_config import IterateConfig
from preftune.onpolicy.iterate_eval import compare, evaluate_answers
from preftune.onpolicy.iterate_store import IterateFolder, round_prompts, settings, split_prompts
from preftune.onpolicy.iterate_table import format_table, round_line, round_row, table
from preftune.onpolicy.judges import Judge
from preftune.onpolicy.pairs import make_pairs, open_judge
from preftune.onpolicy.prompts import Prompt, load_prompts
from preftune.options import MAX_SEED
from preftune.outputs.report import run_metric_rows, write_report
from preftune.recipe import train


@dataclass
class IterateResult:
    output_dir: Path
    model: str  # the result: the last kept round's final/ (the first model when round 1 was rolled back)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # round 0 (the first model), then each round
    stopped: str | None = None  # why the run ended before its last round (a collapse, no gain, no pairs)
    interrupted: bool = False  # a round's training was stopped by a signal: continue with --resume


def _as_config(cfg: Any, judge: Any, options: dict[str, Any]) -> IterateConfig:
    if cfg is None:
        return IterateConfig(**({"judge": judge} if judge is not None and "judge" not in options else {}),
                             **options)
    if isinstance(cfg, dict):
        return IterateConfig.from_dict(cfg)
    if isinstance(cfg, (str, Path)):
        return IterateConfig.from_yaml(cfg)
    if not isinstance(cfg, IterateConfig):
        raise PreftuneError(f"the config must be an IterateConfig, a dict of its keys or the path of a YAML file, got "
                            f"{type(cfg).__name__}.")
    return cfg


def iterate(cfg: IterateConfig | dict | str | Path | None = None, *, judge: Judge | Callable[..., Any] | None = None,
            callbacks: list | None = None, say: Callable[[str], None] = print, **options: Any) -> IterateResult:
    """`preftune iterate` (see the module docstring). `judge` (a Judge or a Python function) replaces cfg.judge;
    `callbacks` join each round's training run; `options` build the IterateConfig when `cfg` is None."""
    cfg = _as_config(cfg, judge, options)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = IterateFolder(cfg.output_dir)
    first = cfg.pairs_config(cfg.model, str(cfg.prompts), str(folder.pairs(1)), seed=cfg.seed)
    # Opened once: a reward model loads once, an endpoint's verdicts are cached for every round.
    judge_obj = open_judge(first, judge, device=device, cache_dir=folder.path, cache_file=folder.judge_cache)
    train_prompts, held = split_prompts(cfg)  # bad prompts: refused before anything is written
    folder.open(settings(cfg, judge_obj), resume=cfg.resume, say=say)
    try:
        train_file = folder.write_prompts(folder.path / "prompts" / "train.jsonl", train_prompts.prompts)
        held = load_prompts(folder.write_prompts(folder.path / "prompts" / "eval.jsonl", held)).prompts
        run = _Run(cfg, folder, judge_obj, held, load_prompts(train_file).prompts, device, say, callbacks or [])
        result = run.rounds()
    finally:
        judge_obj.close()
        folder.release()
    return result


class _Run:
    def __init__(self, cfg: IterateConfig, folder: IterateFolder, judge: Judge, held: list[Prompt],
                 train_prompts: list[Prompt], device: str, say: Callable[[str], None], callbacks: list):
        self.cfg, self.folder, self.judge, self.held, self.train_prompts = cfg, folder, judge, held, train_prompts
        self.device, self.say, self.callbacks = device, say, callbacks
        self.rows: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []

    def rounds(self) -> IterateResult:
        cfg, folder = self.cfg, self.folder
        self.say(f"iterate: {cfg.rounds} round(s) from {cfg.model}; {len(self.train_prompts):,} training and "
                 f"{len(self.held):,} held-out prompts → {folder.path}")
        self.evals.append(self._evaluate(0, cfg.model, None))
        self.rows.append(round_row(0, cfg.model, None, None, [], self.evals[0], None))
        result = IterateResult(folder.path, cfg.model)
        for r in range(1, cfg.rounds + 1):
            start = result.model
            outcome = self._round(r, start)
            if outcome is None:  # interrupted by a signal during training
                result.interrupted = True
                break
            row, verdict = outcome
            self.rows.append(row)
            if verdict.collapsed and cfg.on_collapse == "rollback":
                kept = f"round {r - 1}'s model" if r > 1 else "the first model"
                result.stopped = f"round {r} collapsed: {verdict.reason()}; rolled back, {kept} is the result"
                row["status"] = "collapsed: rolled back"
                break
            result.model = row["model"]
            if verdict.collapsed:
                row["status"] = "collapsed (on_collapse warn: kept)"
                self.say(f"warning: round {r} collapsed: {verdict.reason()}")
            if row.get("pairs") == 0:
                result.stopped = f"round {r} made no pairs (every prompt's answers tied or were too close)"
                break
            if cfg.stop_when_no_gain and no_gain(row["vs_previous"]) and r < cfg.rounds:
                vs = row["vs_previous"]
                result.stopped = (f"no gain in round {r}: its win rate over round {r - 1} is "
                                  f"{100 * vs['win_rate']:.1f}% and its 95% interval includes 50%")
                row["status"] = "kept; no gain: stopped"
                break
        result.rounds = self.rows
        self._finish(result)
        return result

    def _round(self, r: int, start: str) -> tuple[dict[str, Any], Any] | None:
        cfg, folder = self.cfg, self.folder
        timings: dict[str, float] = {}
        self.say(f"round {r}/{cfg.rounds}: pairs from {start}")
        prompts = round_prompts(self.train_prompts, cfg.prompts_per_round, r, cfg.seed)
        folder.make(folder.round_dir(r))  # (never through a link: pairs and train write inside it)
        prompt_file = (folder.write_prompts(folder.round_dir(r) / "prompts.jsonl", prompts) if cfg.prompts_per_round
                       else folder.path / "prompts" / "train.jsonl")
        t0 = time.perf_counter()
        pcfg = cfg.pairs_config(start, str(prompt_file), str(folder.pairs(r)), seed=(cfg.seed + r - 1) % (MAX_SEED + 1))
        pairs = make_pairs(pcfg, judge=self.judge, say=self.say)
        timings["pairs_s"] = time.perf_counter() - t0
        final = folder.train_dir(r) / "final"
        if pairs.rows == 0:
            row = round_row(r, start, start, pairs.summary, [], self.evals[-1], timings)
            return row, check_round([], {}, kl_limit=cfg.collapse_kl)
        t0 = time.perf_counter()
        if not final.is_dir():
            reference = cfg.model if cfg.reference_mode == "fixed" and r > 1 else None
            self.say(f"round {r}/{cfg.rounds}: DPO on {pairs.rows:,} pairs from {start}"
                     f"{f', reference {reference}' if reference else ''}")
            tcfg = cfg.train_config(start, str(folder.pairs(r)), str(folder.train_dir(r)), reference_model=reference)
            res = train(tcfg, callbacks=list(self.callbacks))
            if res.interrupted:
                return None
        timings["train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = self._evaluate(r, str(final), start)
        timings["eval_s"] = time.perf_counter() - t0
        self.evals.append(ev)
        rows = run_metric_rows(folder.train_dir(r))
        verdict = check_round(rows, ev, kl_limit=cfg.collapse_kl)
        row = round_row(r, str(final), start, pairs.summary, rows, ev, timings)
        row["signals"] = verdict.signals
        row["status"] = "kept"
        self.say(round_line(row))
        note = unmoved(ev, self.evals[-2], learning_rate=cfg.learning_rate)
        if note:
            row["note"] = note
            self.say(f"note: round {r}: {note}")
        return row, verdict

    def _evaluate(self, r: int, model: str, start: str | None) -> dict[str, Any]:
        """Round r's held-out evaluation (eval.json), with its win rates over the first model and the round's
        start; read back when an earlier run wrote it."""
        path = self.folder.eval_file(r)
        ev = self.folder.read_json(path)
        if ev is not None:
            return ev
        self.say(f"round {r}: evaluating {model} on {len(self.held):,} held-out prompts")
        kl_to = {} if start is None else {"first": self.cfg.model, "start": start}
        ev = evaluate_answers(model, self.held, self.judge, self.cfg, device=self.device, kl_to=kl_to)
        if start is not None:
            prev = self.evals[-1]
            ev["vs_first"] = compare(self.judge, self.held, ev["greedy"], self.evals[0]["greedy"])
            ev["vs_start"] = compare(self.judge, self.held, ev["greedy"], prev["greedy"])
            ev["samples_vs_start"] = compare(self.judge, self.held, ev["samples"], prev["samples"])
        self.folder.write_json(path, ev)
        return ev

    def _finish(self, result: IterateResult) -> None:
        lines = format_table(self.rows)
        self.folder.write_json(self.folder.rounds_file, {
            "result": result.model, "stopped": result.stopped, "interrupted": result.interrupted,
            "table": table(self.rows), "rounds": self.rows})
        report = write_report(self.folder.path)
        self.say("\n".join(["rounds:", *lines]))
        if result.stopped:
            self.say(f"stopped: {result.stopped}")
        for row in self.rows:
            if row.get("note"):
                self.say(f"note: round {row['round']}: {row['note']}")
        self.say(f"result: {result.model}; table in {self.folder.rounds_file}; report: {report.html}")
