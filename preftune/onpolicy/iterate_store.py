"""The folder of a `preftune iterate` run, and how a stopped run continues where it stopped.

    OUT/
      .preftune-run.json    preftune's mark (as in a training run folder, naming the command iterate)
      iterate.json          what the rounds depend on (settings, the first model's and the prompts' content, the
                            judge): a resumed run must match it
      .preftune.lock        present while a run uses the folder (outputs/lock.py)
      prompts/train.jsonl   the training prompts (the held-out ones left out); prompts/eval.jsonl the held-out ones
      judge-cache.jsonl     an endpoint judge's verdicts, for every round (a rerun never pays twice)
      round-0/eval.json     the first model's held-out answers and their scores
      round-N/              prompts.jsonl (with prompts_per_round), pairs.jsonl (+ its summary and state, as
                            `preftune pairs` writes them), train/ (a `preftune train` run folder), eval.json
      rounds.json           the table of rounds (rewritten after each round), report/report.html

Each phase of a round leaves its mark only once it is complete (the pairs' summary, train/final/, eval.json),
and each one continues by itself when it was stopped midway: `pairs` skips the prompts already judged, `train`
resumes from its newest checkpoint (`resume: auto`), an evaluation is redone whole. So a rerun with `--resume`
continues at the round and phase where the run stopped, and every phase is a pure function of its inputs (the
answers' random streams, the batch order): the same files as a run that was never stopped.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

from preftune.data.cache import source_fingerprint
from preftune.errors import PreftuneError
from preftune.modeling.reference import model_identity
from preftune.onpolicy.iterate_config import IterateConfig
from preftune.onpolicy.judges import Judge
from preftune.onpolicy.prompts import Prompt, Prompts, load_prompts
from preftune.options import may_change
from preftune.outputs.files import TMP, link_error, replace_text, writing
from preftune.outputs.lock import LOCK, RunLock
from preftune.outputs.run_dir import MARK

SETTINGS = "iterate.json"
ROUNDS = "rounds.json"
JUDGE_CACHE = "judge-cache.jsonl"
NAMES = (MARK, LOCK, SETTINGS, ROUNDS, JUDGE_CACHE, "prompts", "report")  # what the run writes in its folder
_ROUND = re.compile(r"round-\d+$")
MAY_CHANGE = may_change(IterateConfig)


def _differences(saved: dict, now: dict) -> list[str]:
    def show(v: Any) -> str:
        text = json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{k} {show(saved.get(k))} → {show(now.get(k))}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def settings(cfg: IterateConfig, judge: Judge) -> dict[str, Any]:
    """What the rounds depend on; the model and the prompts by content, not by the path's spelling."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in MAY_CHANGE}
    values["model"] = model_identity(cfg.model)
    for key in ("prompts", "eval_prompts"):
        if values[key] is not None:
            values[key] = [entry[1:] for entry in source_fingerprint(values[key])]
    values["judge"] = judge.identity()
    return json.loads(json.dumps(values, default=str))


class IterateFolder:
    """The run folder of `preftune iterate`, owned like a training run's (outputs/run_dir.py): preftune's mark
    (.preftune-run.json, naming the command), its lock while a run uses it, every file written whole and never
    through a link, and a folder deleted or moved away mid-run not recreated. Each round's train/ is a training
    run folder of its own (RunDir); each round's pairs.state/ is checked by the pairs store."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.lock = RunLock(self.path / LOCK)

    def round_dir(self, r: int) -> Path:
        return self.path / f"round-{r}"

    def pairs(self, r: int) -> Path:
        return self.round_dir(r) / "pairs.jsonl"

    def train_dir(self, r: int) -> Path:
        return self.round_dir(r) / "train"

    def eval_file(self, r: int) -> Path:
        return self.round_dir(r) / "eval.json"

    @property
    def rounds_file(self) -> Path:
        return self.path / ROUNDS

    @property
    def judge_cache(self) -> Path:
        return self.path / JUDGE_CACHE

    # --- checks
    def _read_mark(self) -> dict | None:
        try:
            mark = json.loads((self.path / MARK).read_text(encoding="utf-8")[:1 << 20])
        except (OSError, ValueError):
            return None
        return mark if isinstance(mark, dict) and mark.get("command") == "iterate" else None

    def check_links(self) -> None:
        """Refuse a symbolic link at any name the run writes: in the folder (its files, prompts/, report/,
        round-N/ and their temporary names) and anything inside prompts/, report/ and round-N/ (iterate's own
        folders) but train/'s and pairs.state/'s contents, which train and pairs check."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            name = p.name.removeprefix(TMP)
            ours = name in NAMES or _ROUND.match(name) or p.name.startswith(TMP + "lock-")
            if ours and p.is_symlink():
                raise link_error(p)
            if p.is_dir() and not p.is_symlink() and (p.name in ("prompts", "report") or _ROUND.match(p.name)):
                for q in p.iterdir():
                    if q.is_symlink():
                        raise link_error(q)

    def check_present(self) -> None:
        """While this run holds the folder: refuse to write on when it was deleted or moved away (its lock is gone)."""
        if self.lock.token is not None and not self.lock.held():
            raise PreftuneError(f"--output-dir {self.path} was deleted or moved away while the run was using it (its "
                                f"{LOCK} is gone), so the run stops instead of writing a partial folder there; continue "
                                "wherever the folder went with --resume, or start again.")

    # --- opening
    def open(self, values: dict[str, Any], *, resume: bool, say=print) -> bool:
        """Check the folder (a new one, or this run's when resuming), take its lock and record `values`; returns
        whether an earlier run's files are there."""
        saved_file = self.path / SETTINGS
        if self.path.is_symlink() and not self.path.exists():
            raise PreftuneError(f"--output-dir {self.path} is a link to a missing folder; pass a folder path.")
        if self.path.exists() and not self.path.is_dir():
            raise PreftuneError(f"--output-dir {self.path} is a file; pass a folder.")
        entries = [p.name for p in self.path.iterdir() if p.name != LOCK] if self.path.is_dir() else []
        # (a folder an iterate run made before the mark existed is known by its iterate.json)
        if entries and not (self._read_mark() or (saved_file.is_file() and MARK not in entries)):
            raise PreftuneError(f"{self.path} is not empty and no preftune iterate run made it (it has no {MARK} "
                                "naming iterate); pass another --output-dir (nothing was changed).")
        if entries and not resume:
            raise PreftuneError(f"{self.path} holds a preftune iterate run; pass --resume to continue it, or another "
                                "--output-dir (nothing was changed).")
        if entries:
            saved = self.read_json(saved_file) or {}
            diff = _differences(saved, values)
            if diff:
                raise PreftuneError(f"{self.path} was made with other settings ({'; '.join(diff[:3])}); resume with "
                                    "the same ones, or pass another --output-dir (nothing was changed).")
        self.check_links()
        with writing(str(self.path), self.path.parent, "pass a folder you can write to as --output-dir"):
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock.acquire(say)
        try:
            self.check_links()  # again under the lock: the folder may have changed while the judge loaded
            if self._read_mark() is None:
                self._write(self.path / MARK, json.dumps({"made_by": "preftune", "command": "iterate",
                                                          "names": [*NAMES, "round-N"], "created": _now()}) + "\n")
            if not entries:
                self.write_json(saved_file, values)
        except BaseException:
            self.release()
            raise
        return bool(entries)

    def release(self) -> None:
        self.lock.release()

    # --- writing
    def make(self, folder: Path) -> Path:
        """Folder `folder` inside the run folder, each missing level made (never through a link)."""
        here = self.path
        for part in folder.relative_to(self.path).parts:
            here = here / part
            if here.is_symlink():
                raise link_error(here)
            if not here.is_dir():
                with writing(str(here), self.path, "run the same command with --resume to continue"):
                    here.mkdir()
        return folder

    def _write(self, path: Path, text: str) -> None:
        """A whole file of the run, written atomically and never through a link (outputs/files.py)."""
        self.check_present()
        self.check_links()
        self.make(path.parent)
        with writing(str(path), self.path, "run the same command with --resume to continue"):
            replace_text(path, text)

    def write_json(self, path: Path, value: Any) -> None:
        self._write(path, json.dumps(value, indent=1, ensure_ascii=False, default=str) + "\n")

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_prompts(self, path: Path, prompts: list[Prompt]) -> Path:
        if not path.is_file():
            self._write(path, "".join(json.dumps({"prompt": p.value}, ensure_ascii=False) + "\n" for p in prompts))
        return path


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def split_prompts(cfg: IterateConfig) -> tuple[Prompts, list[Prompt]]:
    """(training prompts, held-out prompts): eval_prompts when given, else a seeded eval_fraction of the prompts
    (at least one, and at least one left to train on)."""
    train = load_prompts(cfg.prompts, prompt_field=cfg.prompt_field)
    if cfg.eval_prompts is not None:
        return train, load_prompts(cfg.eval_prompts, prompt_field=cfg.prompt_field).prompts
    n = len(train.prompts)
    if n < 2:
        raise PreftuneError(f"{cfg.prompts} holds one prompt: nothing is left to train on once the held-out share is "
                            "taken; pass more prompts or --eval-prompts FILE.")
    order = list(range(n))
    random.Random(f"iterate-split:{cfg.seed}").shuffle(order)
    held = set(order[:min(n - 1, max(1, math.ceil(cfg.eval_fraction * n)))])
    train.prompts = [p for p in train.prompts if p.index not in held]
    return train, [p for p in load_prompts(cfg.prompts, prompt_field=cfg.prompt_field).prompts if p.index in held]


def round_prompts(prompts: list[Prompt], per_round: int, r: int, seed: int) -> list[Prompt]:
    """Round r's training prompts: all of them, or the r-th run of `per_round` in a seeded order (wrapping)."""
    if not per_round or per_round >= len(prompts):
        return prompts
    order = list(range(len(prompts)))
    random.Random(f"iterate-rounds:{seed}").shuffle(order)
    start = (r - 1) * per_round
    return [prompts[order[(start + k) % len(prompts)]] for k in range(per_round)]
