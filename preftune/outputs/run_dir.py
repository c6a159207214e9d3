"""The run folder: every path a run writes is named here, and every write, rename and delete of a run goes
through here (or is wrapped by `RunDir.saving`).

    OUTPUT_DIR/
      .preftune-run.json   the mark: preftune made this folder, and the names it may write in it
      .preftune.lock       present while a run uses the folder (outputs/lock.py)
      config.yaml          the resolved config of the run
      data_summary.txt     what was loaded, dropped, truncated (the lines `train` prints)
      metrics.jsonl        one JSON object per log step (outputs/metrics.py)
      reference_logps/     precomputed reference log-probs, keyed by model, token ids and precision
      data_cache/          tokenized data (memory-mapped arrays), keyed by data, tokenizer and settings
      checkpoints/         step-NNNNNNN/ folders (outputs/checkpoint.py), each with a manifest (outputs/manifest.py)
      final/               the trained model (or adapters)

The folder is the user's data. The rules:
- `RunDir.checked` only checks (nothing is written until the data, tokenizer and model have loaded, so bad input
  leaves nothing behind).
- Ownership: a folder that is not empty is reused (--resume, --overwrite) only if it carries preftune's mark and
  every run file in it is one the mark lists; --overwrite then deletes the listed run files and nothing else (a
  user's own files beside them stay).
- No write, rename or delete follows a symbolic link: any link at a name the run writes is refused, naming it.
  (Checked before each write; a link planted *during* a run by another user of the folder is not defended
  against: that user can already change the run's files.)
- Temporary names start with `.tmp-`; a failed save removes them. A full disk (or a quota, a read-only or
  unwritable folder) while writing anything is one sentence saying what is intact and how to continue.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from preftune.errors import PreftuneError
from preftune.outputs.files import TMP, link_error, replace_text, write_failure
from preftune.outputs.lock import LOCK, RunLock
from preftune.outputs.manifest import list_checkpoints  # the listing rule, without checkpoint.py's torch

MARK = ".preftune-run.json"
CACHE_DIR = "reference_logps"
DATA_CACHE = "data_cache"
CHECKPOINTS = "checkpoints"
# What --overwrite replaces. reference_logps/ and data_cache/ stay: their files are keyed by everything they
# depend on, so a rerun can only ever reuse a matching one.
# report/, eval.json and the trackers' folders are written by the run's callbacks (outputs/report.py,
# evaluate.py, outputs/trackers.py).
RUN_FILES = ("config.yaml", "metrics.jsonl", "final", CHECKPOINTS, "data_summary.txt", "report", "eval.json",
             "tensorboard", "wandb", "mlruns")
OWNED = RUN_FILES + (CACHE_DIR, DATA_CACHE)  # the names the mark lists
_CHECKPOINT_NAME = re.compile(r"(\.tmp-)?step-(\d+)$")
# config keys holding local paths, written absolute into config.yaml
_PATH_KEYS = ("model", "reference_model", "data", "eval_data", "data_cache_dir", "output_dir")


def _delete(path: Path) -> None:
    """Delete a file or folder (never through a link: rmtree removes links inside a folder, not their targets)."""
    if path.is_symlink():
        raise link_error(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _check_creatable(out: Path) -> None:
    """An output folder that does not exist yet must be creatable: its nearest existing parent is a writable
    folder (checked before the data and model load, so the refusal comes at once)."""
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():
            raise PreftuneError(f"cannot create output_dir {out}: {parent} is a link to a missing folder.")
        parent = parent.parent
    if not parent.is_dir():
        raise PreftuneError(f"cannot create output_dir {out}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PreftuneError(f"cannot create output_dir {out}: {parent} is not writable; pass a folder you can "
                            "write to.")


class RunDir:
    """Paths of one run folder and the rules for (re)using it."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = RunLock(path / LOCK)
        # How to continue after a failed write, when the caller does not say.
        self.rerun = "run the same command again"

    @classmethod
    def checked(cls, output_dir: str, *, resume: object, overwrite: bool, cache: str | None = None) -> RunDir:
        """Refuse a folder this run must not write to (`cache`: the data_cache_dir setting); checks only, writes
        nothing."""
        if not output_dir:
            raise PreftuneError("no output_dir given; pass --output-dir PATH for the run's files.")
        out = Path(output_dir).expanduser()
        run = cls(out)
        # A shared cache inside the run folder would be a file the run's mark does not list: the folder would be
        # refused ever after as not made by preftune.
        if cache and Path(cache).expanduser().absolute().is_relative_to(out.absolute()):
            raise PreftuneError(f"data_cache_dir {cache} is inside output_dir {out}; leave data_cache_dir "
                                f"unset (the run keeps its tokenized data in {out / DATA_CACHE}) or choose a folder "
                                "outside the run folder.")
        if not (resume or overwrite):  # once this run has written its first files, a rerun needs --overwrite
            run.rerun = "run again with --overwrite"
        if out.is_symlink() and not out.exists():
            raise PreftuneError(f"output_dir {out} is a link to a missing folder; pass a folder path.")
        if not out.exists():
            _check_creatable(out)
            return run
        if not out.is_dir():
            raise PreftuneError(f"output_dir {out} is a file; pass a folder path.")
        if not os.access(out, os.W_OK | os.X_OK):
            raise PreftuneError(f"output_dir {out} is not writable; pass a folder you can write to.")
        run.check_links()
        if run._entries():
            if not (resume or overwrite):
                raise PreftuneError(f"output_dir {out} is not empty; pass --resume to continue that run, "
                                    "--overwrite to replace its run files, or another --output-dir.")
            run.check_owned()
        run.lock.check()
        return run

    @classmethod
    def existing(cls, path: str | Path, command: str, instead: str) -> RunDir:
        """The run folder a later command writes into (report/, eval.json, final/README.md): only one preftune
        made (its mark), and never through a link at a name a run writes. Such a command writes its own files
        atomically and leaves the run's temporary files alone (a run may be going on)."""
        run = cls(Path(path).expanduser())
        if run.read_mark() is None:
            raise PreftuneError(f"{run.path} was not made by preftune (it has no {MARK}), so `preftune {command}` "
                                f"will not write into it; {instead}.")
        run.check_links()
        run.rerun = f"run `preftune {command}` again"
        return run

    def recorded(self, key: str) -> Any:
        """What the run recorded in its mark under `key` (models: the paths and identities it loaded,
        finished_step: the step final/ was written at), or None."""
        try:
            return (self.read_mark() or {}).get(key)
        except PreftuneError:
            return None

    def record(self, **info: Any) -> None:
        """Add `info` to the mark (the run holds the lock)."""
        with self.saving(MARK):
            replace_text(self.path / MARK, json.dumps({**(self.read_mark() or {}), **info}) + "\n")

    def write_config(self, config: dict[str, Any], identity: dict[str, Any], summary: str) -> None:
        """config.yaml with every local path absolute (a later `preftune eval RUN/final` from another directory
        finds the same models and data), data_summary.txt, and the identities of the models loaded (outputs/
        identity.py), kept in the mark."""
        config = {k: (_absolute(v) if k in _PATH_KEYS else v) for k, v in config.items()}
        self.write_text(self.config, yaml.safe_dump(config, sort_keys=False))
        self.write_text(self.data_summary, summary + "\n")
        models = {k: {"path": config[k], "identity": identity.get(k)} if config.get(k) else None
                  for k in ("model", "reference_model")}
        self.record(models=models)

    def finished(self, resume: object, say: Callable[[str], None] = print) -> bool:
        """Whether `resume` has nothing to do here (said in one sentence): the folder holds a finished run (a
        whole final/, no checkpoint newer than it) and resume is "auto", or true with no checkpoint to continue
        from. So a finished run's final/ is never deleted by a rerun of its command."""
        if not resume or not self.final.is_dir() or self.final.is_symlink():  # (TrainConfig.resume's values)
            return False
        step = self.recorded("finished_step")
        steps = [int(m.group(2)) for p in (self.checkpoints.iterdir() if self.checkpoints.is_dir() else ())
                 if (m := _CHECKPOINT_NAME.match(p.name)) and not m.group(1)]
        newest = max(steps, default=None)
        if resume == "auto":
            if newest is not None and (not isinstance(step, int) or newest > step):
                return False  # stopped while training on after a finish: continue from the checkpoint
        elif resume is not True or newest is not None:
            return False
        at = f" of step {step}" if isinstance(step, int) else ""
        more = (f"; to train on, pass --resume with a larger --max-steps (from step-{newest:07d})"
                if newest is not None else "")
        say(f"output_dir {self.path} holds a finished run (final/{at}): nothing to resume{more}; pass --overwrite "
            "to train again from the start, or another --output-dir.")
        return True

    # --- the paths
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def data_summary(self) -> Path:
        return self.path / "data_summary.txt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def data_cache(self) -> Path:
        return self.path / DATA_CACHE

    def reference_cache(self, split: str, key: str) -> Path:
        path = self.path / CACHE_DIR / f"{split}-{key}.safetensors"
        for p in (path.parent, path, path.with_name(TMP + path.name)):
            if p.is_symlink():
                raise link_error(p)
        return path

    # --- checks
    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def read_mark(self) -> dict | None:
        mark = self.path / MARK
        if not mark.exists():
            return None
        try:
            info = json.loads(mark.read_text(encoding="utf-8")[:1 << 20])
            if isinstance(info, dict) and isinstance(info.get("names"), list):
                return info
        except (OSError, ValueError):
            pass
        raise PreftuneError(f"{mark} is damaged, so preftune cannot tell which files in {self.path} it wrote; "
                            "move your own files out and delete the folder, or choose another --output-dir.")

    def check_owned(self) -> None:
        """A non-empty folder is reused only if preftune made it and wrote every run file in it."""
        mark = self.read_mark()
        if mark is None:
            raise PreftuneError(f"output_dir {self.path} was not made by preftune (it has no {MARK}), so --resume "
                                "and --overwrite will not write into it; choose a new or empty --output-dir.")
        if mark.get("command") not in (None, "train"):  # e.g. a `preftune iterate` folder: not a training run's
            raise PreftuneError(f"output_dir {self.path} holds a `preftune {mark['command']}` run, not a training "
                                "run; choose a new or empty --output-dir.")
        foreign = [n for n in OWNED if (self.path / n).exists() and n not in mark["names"]]
        if self.checkpoints.is_dir():
            foreign += [f"{CHECKPOINTS}/{c.name}" for c in sorted(self.checkpoints.iterdir())
                        if not _CHECKPOINT_NAME.match(c.name)]
        if foreign:
            raise PreftuneError(f"output_dir {self.path} holds {', '.join(foreign)}, which preftune did not write "
                                f"(not listed in {MARK}); move {'it' if len(foreign) == 1 else 'them'} out of the "
                                "folder or choose another --output-dir, so that no run replaces "
                                f"{'it' if len(foreign) == 1 else 'them'}.")

    def check_links(self) -> None:
        """Refuse a symbolic link at any name a run writes, renames or deletes."""
        names = [*OWNED, MARK, LOCK, *(TMP + n for n in (*OWNED, MARK))]
        if self.path.is_dir():
            names += [p.name for p in self.path.iterdir() if p.name.startswith(TMP + "lock-")]
        for name in names:
            if (self.path / name).is_symlink():
                raise link_error(self.path / name)
        for folder in (self.checkpoints, self.path / CACHE_DIR, self.path / DATA_CACHE):
            if folder.is_dir():
                for child in folder.iterdir():
                    if child.is_symlink():
                        raise link_error(child)

    # --- writing
    def create(self, *, clear: bool, say: Callable[[str], None] = print) -> None:
        """Make the folder and lock it; `clear` (a fresh run with --overwrite) deletes the run files the mark
        lists and nothing else. The ownership checks are repeated under the lock (the folder may have changed
        while the data and model loaded)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PreftuneError(f"cannot create output_dir {self.path} ({e.strerror or e}); pass a folder path "
                                "you can write to.") from None
        self.check_links()
        with self.saving("the lock file"):
            self.lock.acquire(say)
        try:
            mark = self.read_mark()
            if self._entries():
                self.check_owned()
            self.check_links()
            self.remove_temporaries()  # a killed run's half-written files (we hold the lock: none is being written)
            with self.saving(MARK):
                names = sorted(set(mark["names"] if mark else []) | set(OWNED))
                # what the previous run recorded (its models, its finish) stays for a resume, goes with --overwrite
                kept = {} if clear else {k: v for k, v in (mark or {}).items() if k not in ("names", "made_by")}
                replace_text(self.path / MARK, json.dumps({**kept, "made_by": "preftune", "names": names,
                                                           "created": (mark or {}).get("created") or _now()}) + "\n")
                if clear:
                    for name in RUN_FILES:
                        _delete(self.path / name)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self.lock.release()

    def check_present(self) -> None:
        """While this run holds the folder: refuse to write on when the folder was deleted or moved away (its
        lock is gone), rather than make a partial run folder without its mark at the old path."""
        if self.lock.token is not None and not self.lock.held():
            raise PreftuneError(f"output_dir {self.path} was deleted or moved away while the run was using it (its "
                                f"{LOCK} is gone), so the run stops instead of writing a partial run folder there; "
                                "what it wrote so far is wherever the folder went: continue there with --resume, "
                                "or start again.")

    def write_text(self, path: Path, text: str) -> None:
        """Write a whole run file atomically: readers see the old or the new content, never a half-written one."""
        with self.saving(path.name):
            replace_text(path, text)

    def copy_in(self, src: Path, dest: Path) -> None:
        """Replace run file `dest` by a copy of `src` (a checkpoint's metrics, on resume)."""
        self.write_text(dest, src.read_text(encoding="utf-8"))

    def restore_metrics(self, checkpoint: Path, step: int) -> None:
        """On resume: metrics.jsonl as the checkpoint saved it, without the lines logged after its step (the
        resumed run writes them again)."""
        from preftune.outputs.metrics import MetricsWriter  # (it imports torch; this module need not)

        if (checkpoint / "metrics.jsonl").is_file():
            self.copy_in(checkpoint / "metrics.jsonl", self.metrics)
        with self.saving("metrics.jsonl"):
            MetricsWriter(self.metrics).truncate_after(step)

    def remove_temporaries(self) -> None:
        """Delete what a failed (or killed) save left behind: the temporary names of run files in the folder
        (a user's own `.tmp-notes` beside them stays), and every `.tmp-*` in checkpoints/ and the cache."""
        ours = {TMP + n for n in (*OWNED, MARK)}
        for folder in (self.path, self.checkpoints, self.path / CACHE_DIR):
            if folder.is_dir() and not folder.is_symlink():
                for p in folder.iterdir():
                    if p.name.startswith(TMP) and (folder != self.path or p.name in ours
                                                   or p.name.startswith(TMP + "lock-")):
                        with contextlib.suppress(OSError):
                            p.unlink() if p.is_symlink() or not p.is_dir() else shutil.rmtree(p)

    def keep_weights(self, step: int, write_checkpoint: Callable[[], Path]) -> tuple[str, str]:
        """After final/ could not be written (its partial files are gone): keep the trained weights as a
        checkpoint of this step if there is none (smaller than final/ for LoRA with --merge-lora); (what is
        kept, how to continue). Checkpoints are never deleted before final/ is whole."""
        saved = [p for p in list_checkpoints(self.path) if p.name == f"step-{step:07d}"]
        if not saved:
            try:
                saved = [write_checkpoint()]
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # the disk is still full (DCP raises BaseExceptions): what was kept is all there is
                self.remove_temporaries()
        resume = "run the same command with --resume to write final/"
        if saved:
            return f"the trained weights of step {step} are kept in {saved[0]}", resume
        older = list_checkpoints(self.path)
        if older:
            return f"the newest checkpoint, {older[-1]}, is intact (the steps after it are lost)", resume
        return ("no checkpoint could be kept, so the trained weights are lost (--save-steps N keeps checkpoints)",
                "train again")

    @contextlib.contextmanager
    def saving(self, what: str, kept: str | Callable[[], tuple[str, str]] = "the files written before are intact",
               then: str | None = None) -> Iterator[None]:
        """Around any write of the run: links are refused first; a full disk (quota, read-only or unwritable
        folder) becomes one sentence, after the temporary files are removed. `kept` says what is intact and
        `then` how to continue (or a callable, asked after the clean-up, e.g. to rescue the weights, gives both)."""
        self.check_present()
        self.check_links()
        try:
            yield
        except (PreftuneError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # torch.distributed.checkpoint wraps a write's OSError in a BaseException
            failure = write_failure(e, self.path)
            if failure is None:
                self.check_present()  # a write into a folder deleted meanwhile fails as "no such file"
                raise
            if self.lock.token is not None:  # only the run that holds the folder clears its temporaries
                self.remove_temporaries()
            state, then = kept() if callable(kept) else (kept, then or self.rerun)
            what_went_wrong, fix = failure
            free = ""
            with contextlib.suppress(OSError):
                free = f" ({shutil.disk_usage(self.path).free / 2**20:.1f} MiB free)"
            raise PreftuneError(f"{what_went_wrong} while writing {what} in {self.path}{free}; {state}; no partial "
                                f"file was left behind: {fix} and {then}.") from None


def _absolute(value: Any) -> Any:
    """A local path (or glob of local files) made absolute; hub names and anything else as given."""
    if isinstance(value, (list, tuple)):
        return [_absolute(v) for v in value]
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if path.exists() or (any(c in value for c in "*?[") and path.parent.is_dir()):
        return str(path.absolute())
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
