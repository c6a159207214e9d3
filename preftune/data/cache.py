"""Where tokenized data is kept between runs, and what it is keyed by.

An entry is a folder `<cache>/<key>/` (see `preftune.data.splits` for its contents). The key is a hash of
everything that changes the token ids or the splits: the content of every data file (SHA-256 of the bytes; a
saved dataset by its files' names, sizes and times and its own fingerprint; a hub dataset by the fingerprint
`datasets` gives it), the tokenizer (its whole definition, special tokens and chat template), the settings
that shape records and ids (task, format, field names, prompt template, skip_invalid, max lengths, the eval
hold-out and its seed), the versions of `tokenizers` and `transformers`, and `STORE_VERSION`, bumped whenever
preftune's tokenization changes.

The cache folder is the run folder's `data_cache/` (a rerun or a resume of the run reuses it), or the shared
`data_cache_dir` setting (every run with the same key reuses it). An entry is built in a staging folder and
renamed into place, so readers see a whole entry or none; two processes building the same key both succeed
(the second rename loses, and its copy is dropped). A fresh run's folder does not exist until its model has
loaded (nothing may be left behind by a run that fails earlier), so its entry is staged in the temporary
folder and moved in by `DataEntry.keep_in` once the run folder exists.

An entry is checked every time it is opened against `files.json`, written as it is committed: each file's
size, modification time and a SHA-256 of 1 MiB sampled across it (the whole of a smaller file), so a
truncated, missing or edited file (an ids.bin changed by hand) is found for the cost of reading a few MiB, and
the entry is built again after one line saying why. A staging folder is named after its machine and process
(`.tmp-<key>-<host>-<pid>`, `preftune-data-<key>-<host>-<pid>-*` in the temporary folder), so one left behind
by a killed process is deleted by the next build on that machine.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from preftune.data.readers import load_hub_dataset
from preftune.data.sources import resolve
from preftune.errors import PreftuneError

STORE_VERSION = 1


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(source: Any, split: str = "train") -> list:
    """What identifies the data `source` (as `load_records` takes it): per input, its name and a content hash."""
    out = []
    for inp in resolve(source):
        if inp.how == "file":
            try:
                out.append([inp.name, _sha256_file(inp.path)])
            except OSError as e:
                raise PreftuneError(f"cannot read data file {inp.name}: {e.strerror or e}") from None
        elif inp.how == "disk":
            files = sorted(p for p in inp.path.rglob("*") if p.is_file())
            small = {str(p.relative_to(inp.path)): _sha256_file(p) for p in files if p.suffix == ".json"}
            stat = [[str(p.relative_to(inp.path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
            out.append([inp.name, split, small, stat])
        else:
            out.append([inp.name, split, getattr(load_hub_dataset(inp, split), "_fingerprint", None)])
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that can change token ids or rendered texts."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a Python tokenizer: its vocabulary and settings
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
    details = [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.bos_token_id,
               tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None),
               bool(getattr(tokenizer, "split_special_tokens", False)), getattr(tokenizer, "add_bos_token", None),
               getattr(tokenizer, "add_eos_token", None)]
    h.update(json.dumps(details, default=str).encode())
    return h.hexdigest()


def library_versions() -> dict:
    import tokenizers
    import transformers

    return {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__, "store": STORE_VERSION}


def make_key(ingredients: dict) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:24]


class DataEntry:
    """One cache entry's folder: complete (`path`), or staged in the temporary folder until `keep_in`."""

    def __init__(self, path: Path, key: str, staged: bool):
        self.path, self.key, self.staged = path, key, staged
        # a staged entry nobody keeps goes when its split does (or at exit); memory maps outlive the names
        self._cleanup = weakref.finalize(self, shutil.rmtree, path, True) if staged else None

    def keep_in(self, cache_dir: Path) -> Path:
        """Move a staged entry into `cache_dir` (now that it may be written); returns the entry's new folder.
        Files already memory-mapped stay valid (the mapping holds the data, wherever the name goes)."""
        if not self.staged:
            return self.path
        target = commit(self.path, cache_dir, self.key)
        if self._cleanup is not None:
            self._cleanup.detach()
        self.path, self.staged = target, False
        return target


FILES = "files.json"
_HOST = re.sub(r"[^\w.]", "_", socket.gethostname())[:64]
# staging and discarded entries of a process: `.tmp-[old-]<key>-<host>-<pid>` (before: `.tmp-<key>-<pid>`)
_CACHE_TMP = re.compile(r"^\.tmp-(?:old-)?[0-9a-f]+-(?:(?P<host>[\w.]+)-)?(?P<pid>\d+)$")
_TEMP_STAGING = re.compile(r"^preftune-data-[0-9a-f]+-(?P<host>[\w.]+)-(?P<pid>\d+)-\w+$")


def _staging_name(key: str, kind: str = "") -> str:
    return f".tmp-{kind}{key}-{_HOST}-{os.getpid()}"


def prepare_dir(path: Path) -> Path:
    """The shared cache folder (`data_cache_dir`), made when missing: a file in the way, or a folder that cannot
    be made, is one sentence."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PreftuneError(f"data_cache_dir {path} is a file (or inside one), not a folder; pass a folder for the "
                            "tokenized data.") from None
    except OSError as e:
        raise PreftuneError(f"cannot create data_cache_dir {path} ({e.strerror or e}); pass a folder you can "
                            "write to.") from None
    return path


def _dead(host: str | None, pid: str) -> bool:
    """Whether the process that named a staging folder is gone: this machine's, and no longer running (a folder
    of another machine sharing the cache is left to that machine)."""
    if host not in (None, _HOST):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return False


def sweep(folder: Path, pattern: re.Pattern = _CACHE_TMP) -> None:
    """Delete the staging folders in `folder` whose process has died (killed while tokenizing)."""
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            m = pattern.match(p.name)
            if m and int(m["pid"]) != os.getpid() and _dead(m["host"], m["pid"]) and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def _sample(path: Path, blocks: int = 64, block: int = 16384) -> str:
    """SHA-256 of `blocks` evenly spaced blocks of a file (1 MiB read, the whole file when smaller)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= blocks * block:
            h.update(f.read())
        else:
            for k in range(blocks):
                f.seek(size * k // blocks)
                h.update(f.read(block))
    return h.hexdigest()


def _facts(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, _sample(path)]


def _record_files(folder: Path) -> None:
    files = {str(p.relative_to(folder)): _facts(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / FILES).write_text(json.dumps(files), encoding="utf-8")


def entry_problem(folder: Path) -> str | None:
    """Why the entry in `folder` is not the one that was written (a file missing, cut, replaced or edited), or
    None; see the module docstring."""
    try:
        recorded = json.loads((folder / FILES).read_text(encoding="utf-8")[:1 << 20])
    except FileNotFoundError:
        return f"it has no {FILES} (written by an older preftune), so its files cannot be checked"
    except (OSError, ValueError):
        return f"its {FILES} is unreadable"
    if not isinstance(recorded, dict):
        return f"its {FILES} is damaged"
    for name, facts in recorded.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return f"{name} is missing"
        try:
            now = _facts(path)
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
        if not isinstance(facts, list) or len(facts) != 3 or now[0] != facts[0]:
            return f"{name} has {now[0]:,} bytes instead of {facts[0] if isinstance(facts, list) else '?'}"
        if now != facts:
            return f"{name} changed after it was written"
    return None


def _full(e: BaseException) -> bool:
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)


@contextlib.contextmanager
def building(staging: Path) -> Iterator[None]:
    """Around building an entry in `staging`: whatever stops it, the folder goes; a full disk is one sentence."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and _full(e):
            raise PreftuneError(f"the disk filled while writing the tokenized data in {staging.parent}"
                                f"{_free(staging.parent)}; nothing else was changed; no partial file was left "
                                "behind: free space (or point TMPDIR or --data-cache-dir at a larger disk) and run "
                                "the same command again.") from None
        raise


def _free(folder: Path) -> str:
    with contextlib.suppress(OSError):
        return f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free)"
    return ""


def commit(staging: Path, cache_dir: Path, key: str) -> Path:
    """Rename (or copy, across file systems) a finished `staging` folder to `cache_dir/key`, atomically, with the
    record of its files that `find` checks."""
    target = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not (staging / FILES).is_file():
        _record_files(staging)
    if staging.parent.resolve() != cache_dir.resolve():
        local = cache_dir / _staging_name(key)
        shutil.rmtree(local, ignore_errors=True)
        try:
            os.rename(staging, local)
        except OSError:  # another file system: copy, then drop the original
            with building(local):
                shutil.copytree(staging, local)
            shutil.rmtree(staging, ignore_errors=True)
        staging = local
    if target.exists() and not (target / "meta.json").is_file():  # a broken entry (meta.json removed): replace it
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:  # another process committed the same key first: its entry is identical, keep it
        if not (target / "meta.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find(cache_dir: Path | None, key: str, say: Callable[[str], None] = print) -> Path | None:
    """The complete, intact entry for `key`, or None: a damaged one is said in one line and moved away (so the
    rebuilt one takes its place)."""
    if cache_dir is None:
        return None
    path = cache_dir / key
    if not (path / "meta.json").is_file():
        return None
    problem = entry_problem(path)
    if problem is None:
        return path
    say(f"data cache entry {path} is unusable ({problem}); tokenizing the data again")
    aside = cache_dir / _staging_name(key, "old-")
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rename(path, aside)  # (another process may have moved it already)
    shutil.rmtree(aside, ignore_errors=True)
    return None


def staging_folder(cache_dir: Path | None, key: str) -> tuple[Path, bool]:
    """(a fresh folder to build an entry in, whether it is in the temporary folder): beside the entries when
    the cache folder already exists, else in the temporary folder (TMPDIR). Staging folders of processes that
    died are deleted first."""
    temp = Path(tempfile.gettempdir())
    sweep(temp, _TEMP_STAGING)
    if cache_dir is not None and cache_dir.is_dir():
        sweep(cache_dir)
        path = cache_dir / _staging_name(key)
        shutil.rmtree(path, ignore_errors=True)
        try:
            path.mkdir()
        except OSError as e:
            raise PreftuneError(f"cannot write the tokenized data into {cache_dir} ({e.strerror or e}); make it "
                                "writable or pass another --data-cache-dir.") from None
        return path, False
    path = Path(tempfile.mkdtemp(prefix=f"preftune-data-{key[:8]}-{_HOST}-{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)  # mkdtemp's 0700 would follow the entry into the run folder
    return path, True
