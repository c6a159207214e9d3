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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

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
    from preftune.data.sources import resolve

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
            from preftune.data.readers import load_hub_dataset

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


def commit(staging: Path, cache_dir: Path, key: str) -> Path:
    """Rename (or copy, across file systems) a finished `staging` folder to `cache_dir/key`, atomically."""
    target = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    if staging.parent.resolve() != cache_dir.resolve():
        local = cache_dir / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(local, ignore_errors=True)
        try:
            os.rename(staging, local)
        except OSError:  # another file system: copy, then drop the original
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


def find(cache_dir: Path | None, key: str) -> Path | None:
    """The complete entry for `key`, or None."""
    if cache_dir is None:
        return None
    path = cache_dir / key
    return path if (path / "meta.json").is_file() else None


def staging_folder(cache_dir: Path | None, key: str) -> tuple[Path, bool]:
    """(a fresh folder to build an entry in, whether it is in the temporary folder): beside the entries when
    the cache folder already exists, else in the temporary folder (TMPDIR)."""
    if cache_dir is not None and cache_dir.is_dir():
        path = cache_dir / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path, False
    path = Path(tempfile.mkdtemp(prefix=f"preftune-data-{key[:8]}-"))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)  # mkdtemp's 0700 would follow the entry into the run folder
    return path, True
