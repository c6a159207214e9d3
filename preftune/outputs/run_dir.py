"""The run folder: every path a run writes is named here, and only here.

    OUTPUT_DIR/
      config.yaml          the resolved config of the run
      data_summary.txt     what was loaded, dropped, truncated (the lines `train` prints)
      metrics.jsonl        one JSON object per log step (outputs/metrics.py)
      reference_logps/     precomputed reference log-probs, keyed by model, token ids and precision
      data_cache/          tokenized data (memory-mapped arrays), keyed by data, tokenizer and settings
      checkpoints/         step-NNNNNNN/ folders (outputs/checkpoint.py)
      final/               the trained model (or adapters)

`RunDir.plan` only checks (nothing is written until the data, tokenizer and model have loaded, so bad input
leaves nothing behind); `create` makes the folder and, with --overwrite, clears the files a run writes and
nothing else.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from preftune.errors import PreftuneError

# What --overwrite replaces. reference_logps/ and data_cache/ stay: their files are keyed by everything they
# depend on, so a rerun can only ever reuse a matching one.
RUN_FILES = ("config.yaml", "metrics.jsonl", "final", "checkpoints", "data_summary.txt")


class RunDir:
    """Paths of one run folder and the rules for (re)using it."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def plan(cls, output_dir: str, *, resume: object, overwrite: bool) -> RunDir:
        """Refuse a non-empty folder unless resuming or overwriting; checks only, writes nothing."""
        if not output_dir:
            raise PreftuneError("no output_dir given; pass --output-dir PATH for the run's files.")
        out = Path(output_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise PreftuneError(f"output_dir {out} is a file; pass a folder path.")
        if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
            raise PreftuneError(f"output_dir {out} is not empty; pass --resume to continue that run, "
                                "--overwrite to replace its run files, or another --output-dir.")
        return cls(out)

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
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def data_cache(self) -> Path:
        return self.path / "data_cache"

    def reference_cache(self, split: str, key: str) -> Path:
        return self.path / "reference_logps" / f"{split}-{key}.safetensors"

    # --- writing
    def create(self, *, clear: bool) -> None:
        """Make the folder; `clear` (a fresh run with --overwrite) removes the previous run's files only."""
        self.path.mkdir(parents=True, exist_ok=True)
        if clear:
            for name in RUN_FILES:  # only what a run writes: a user's other files in the folder stay
                p = self.path / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()

    def write_text(self, path: Path, text: str) -> None:
        """Write a whole file atomically: readers see the old or the new content, never a half-written one."""
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
