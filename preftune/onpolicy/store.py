"""The files of a `preftune pairs` run, and how a killed run continues without judging a prompt twice.

For `--output pairs.jsonl`:

    pairs.jsonl            the pairs, one JSON object a line, sorted by prompt once the run ends
    pairs.summary.json     the summary (counts, gap distribution, length bias)
    pairs.state/           settings.json (what the rows depend on: a rerun must match it),
                           done-R.jsonl (a line per prompt process R finished: its counts, gaps and lengths),
                           rows-R.jsonl (the pairs of process R > 0 until the end; process 0 appends to pairs.jsonl),
                           judge-cache-R.jsonl (an endpoint judge's scores)

A process appends a batch's pairs, flushes them to disk, then its done lines: a prompt is done once its done line
is written and its rows are there. A rerun first drops from a process's pairs file the rows of prompts that its
done file does not list (a kill between the two writes) and a line cut in the middle, and from its done file the
prompts whose rows are missing, so a prompt's pairs are written exactly once (they are drawn from the prompt's
own random streams, so the rerun writes the same ones). Prompts go to processes
by index (prompt i to process i mod world), skipping done ones, so a rerun may use another number of processes.
When every prompt is done, process 0 gathers the rows, sorted by prompt index, into pairs.jsonl (one atomic
replace) and writes the summary: the same bytes however many processes ran and however often it was killed.

Every write goes through preftune's one writer (outputs/files.py), as a run folder's files do: whole files
replaced atomically (and on disk first), appends opened without following a link, and a symbolic link at any name
the run writes (the output, its summary, the state folder and anything in it) refused with one sentence before
anything is written. The state folder is preftune's (settings.json marks it): an existing folder without it is
refused. No lock: the processes of one launch share these files (each writes its own), and pairs has no
process group in which the first could tell the others a folder is taken.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.outputs.files import TMP, append_text, link_error, replace_text, writing

FIX = "pass another --output"  # how a refused link or folder is avoided
CONTINUE = "run the same command again to continue from what was written"


def _jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL file this module wrote (a last line cut by a kill is left out)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def _write_atomic(path: Path, text: str, *, unique: bool = False) -> None:
    """A whole file replaced atomically, on disk first, never through a link (outputs/files.py)."""
    with writing(str(path), path.parent, CONTINUE):
        replace_text(path, text, FIX, durable=True, unique=unique)


def _lines(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _differences(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k} {_show(saved.get(k))} → {_show(now.get(k))}" for k in keys if saved.get(k) != now.get(k)]


def _show(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


class PairsStore:
    """The output and state files of one process (`rank` of `world`)."""

    def __init__(self, output: str | Path, rank: int = 0, world: int = 1):
        self.output = Path(output)
        stem = self.output.name[: -len(".jsonl")]
        self.summary_path = self.output.with_name(stem + ".summary.json")
        self.state = self.output.with_name(stem + ".state")
        self.rank, self.world = rank, world

    def rows_path(self, rank: int) -> Path:
        return self.output if rank == 0 else self.state / f"rows-{rank}.jsonl"

    def done_path(self, rank: int) -> Path:
        return self.state / f"done-{rank}.jsonl"

    def judge_cache(self) -> Path:
        return self.state / f"judge-cache-{self.rank}.jsonl"

    # ------------------------------------------------------------------------------------------------ opening

    def check_links(self) -> None:
        """Refuse a symbolic link at any name this run writes: the output, its summary (and their temporary
        names), the state folder and anything in it."""
        names = [self.output, self.summary_path, self.state, *(p.with_name(TMP + p.name)
                                                               for p in (self.output, self.summary_path))]
        names += list(self.state.iterdir()) if self.state.is_dir() and not self.state.is_symlink() else []
        for path in names:
            if path.is_symlink():
                raise link_error(path, FIX)

    def open(self, settings: dict[str, Any]) -> dict[int, dict]:
        """Check `settings` against a run already in these files (or record them), make this process's files
        consistent, and return every prompt already done (index → its done line)."""
        self.check_links()
        saved_file = self.state / "settings.json"
        if self.state.exists() and not self.state.is_dir():
            raise PreftuneError(f"{self.state} is a file, where `preftune pairs` keeps its state; {FIX} (nothing was "
                                "changed).")
        if not saved_file.is_file():
            if self.output.exists():
                raise PreftuneError(f"{self.output} exists and no {self.state.name}/ folder beside it says a `preftune "
                                    "pairs` run wrote it; pass another --output (nothing was changed).")
            # (another process of this launch may be writing settings.json: its temporary file is not foreign)
            if self.state.is_dir() and any(not p.name.startswith(TMP) for p in self.state.iterdir()):
                raise PreftuneError(f"{self.state} holds files no `preftune pairs` run wrote (it has no settings.json); "
                                    f"move them away or {FIX} (nothing was changed).")
            with writing(str(self.state), self.state.parent, f"{FIX} (nothing else was changed)"):
                self.state.mkdir(parents=True, exist_ok=True)
            # every process of a launch writes the same settings at once: each through a temporary name of its own
            _write_atomic(saved_file, json.dumps(settings, indent=1, sort_keys=True, default=str) + "\n", unique=True)
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
        diff = _differences(saved, json.loads(json.dumps(settings, default=str)))
        if diff:
            raise PreftuneError(f"{self.output} was made with other settings ({'; '.join(diff[:3])}); rerun with the "
                                "same ones to continue it, or pass another --output.")
        self._reconcile()
        return self.done()

    def _reconcile(self) -> None:
        """Make this process's done file and pairs file vouch for each other (see the module docstring): a done
        line whose rows are not all in the pairs file (a file removed or cut by hand) is dropped, so its prompt
        is done again; rows no done line lists are dropped."""
        done_file, rows_file = self.done_path(self.rank), self.rows_path(self.rank)
        done, rows = _jsonl(done_file), _jsonl(rows_file)
        found = Counter(r["source"]["prompt_index"] for r in rows)
        kept = [d for d in done if "skip" in d or found[d["i"]] == len(d["pairs"])]
        mine = {d["i"] for d in kept}
        if self.rank == 0:  # after a gathering killed midway, process 0's file also holds other processes' rows
            mine |= {i for i, d in self.done().items() if d["rank"] != 0}
        for path, lines in ((done_file, kept), (rows_file, [r for r in rows if r["source"]["prompt_index"] in mine])):
            if path.is_file() and _lines(lines) != path.read_text(encoding="utf-8"):
                _write_atomic(path, _lines(lines))

    def done(self) -> dict[int, dict]:
        """Every prompt any process has finished (index → its done line; a prompt two files list: the lower rank's)."""
        out: dict[int, dict] = {}
        for rank in sorted(self._ranks(), reverse=True):
            for d in _jsonl(self.done_path(rank)):
                out[d["i"]] = {**d, "rank": rank}
        return out

    def _ranks(self) -> list[int]:
        return [int(p.stem.split("-")[1]) for p in self.state.glob("done-*.jsonl") if p.stem.split("-")[1].isdigit()]

    # -------------------------------------------------------------------------------------------- appending

    def append(self, rows: list[dict], done: list[dict]) -> None:
        """One batch: its pairs (flushed to disk), then the done lines of its prompts."""
        for path, lines in ((self.rows_path(self.rank), rows), (self.done_path(self.rank), done)):
            if lines:
                with writing(str(path), path.parent, CONTINUE):
                    append_text(path, _lines(lines), FIX, durable=True)  # never through a link, whole lines

    # -------------------------------------------------------------------------------------------- finishing

    def wait_for(self, total: int, poll_s: float = 0.2) -> dict[int, dict]:
        """Process 0: wait until the processes have finished all `total` prompts (a process that fails ends the
        whole launch, so this never waits for a dead one)."""
        while True:
            done = self.done()
            if len(done) >= total:
                return done
            time.sleep(poll_s)

    def gather(self, done: dict[int, dict]) -> int:
        """Every process's rows into the output, sorted by prompt index; returns the number of rows.

        A prompt's rows come from the file of the process whose done file lists it (the lowest rank if several
        do: after a gathering killed before it removed the other processes' files, the output lists them too)."""
        rows: list[dict] = []
        for rank in sorted(set(self._ranks()) | {0}):
            rows += [r for r in _jsonl(self.rows_path(rank)) if done.get(r["source"]["prompt_index"], {}).get("rank") == rank]
        rows.sort(key=lambda r: r["source"]["prompt_index"])  # stable: a prompt's pairs keep their order
        _write_atomic(self.output, _lines(rows))
        _write_atomic(self.done_path(0), _lines({k: v for k, v in d.items() if k != "rank"}
                                                for _, d in sorted(done.items())))
        for path in [*self.state.glob("done-*.jsonl"), *self.state.glob("rows-*.jsonl")]:
            if path != self.done_path(0):
                path.unlink(missing_ok=True)
        return len(rows)

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_atomic(self.summary_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

