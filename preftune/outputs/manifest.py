"""Which checkpoints a run folder holds, and their integrity: a manifest of every file's size and SHA-256, written once the checkpoint folder is
complete (before it is renamed into place) and verified before a resume loads it.

It covers whatever files the folder holds (weights, optimizer, RNG, accelerate's shards, copies of the metrics
and config), so it does not depend on how a checkpoint is laid out. A checkpoint that fails (a file missing,
truncated, changed, replaced by a link, or no manifest because the folder was never finished) is reported and
`--resume` uses the newest intact one, saying so; an explicitly named damaged checkpoint is refused, naming the
newest intact one instead (checkpoint.pick_checkpoint).

Cost: one extra read of the checkpoint at save time and one at resume (SHA-256 in 1 MiB blocks, measured at
0.6 GiB/s per core on a busy 2-core machine; the files of a checkpoint are hashed in parallel threads, as hashlib
releases the GIL, so a sharded checkpoint goes as fast as the disk and cores allow).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"step-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders (step-N, not links) in step order, whole or not (`damage` tells)."""
    return step_folders(run_dir / CHECKPOINTS)


def step_folders(root: Path) -> list[Path]:
    """The step-N folders in `root` (not links), in step order; [] when `root` is no folder."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()
             and not p.is_symlink()]
    return [p for _, p in sorted(found)]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(sha256, paths))


def write_manifest(folder: Path) -> None:
    """Record every file under `folder` (call once the folder is complete, before renaming it into place)."""
    paths = [p for p in sorted(folder.rglob("*")) if p.relative_to(folder).as_posix() != MANIFEST and not p.is_dir()]
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _hash_all(paths))}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def damage(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be trusted, or None when every recorded file is whole."""
    manifest = folder / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return f"it has no {MANIFEST}, so it was never completely written"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        entries = [(str(rel), int(info["size"]), str(info["sha256"])) for rel, info in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    for rel, size, _ in entries:  # the cheap checks first, then the hashes
        p = folder / rel
        if rel.startswith("/") or ".." in Path(rel).parts:
            return f"its {MANIFEST} names a file outside it ({rel})"
        if any(q.is_symlink() for q in [p, *p.parents][: len(Path(rel).parts)]):
            return f"{rel} is a symbolic link"
        if not p.is_file():
            return f"{rel} is missing"
        actual = p.stat().st_size
        if actual != size:
            return f"{rel} has {actual:,} bytes instead of {size:,}"
    digests = _hash_all([folder / rel for rel, _, _ in entries])
    for (rel, _, digest), actual_digest in zip(entries, digests):
        if actual_digest != digest:
            return f"{rel} does not match its recorded SHA-256 (the file changed after it was saved)"
    return None
