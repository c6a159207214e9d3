"""Writing a file the way every preftune command writes one: whole (atomically, readers see the old or the new
content), never through a symbolic link, and a failure the user can fix (a full disk, a quota, a read-only or
unwritable folder) told as one sentence. The run folder (run_dir.py) writes its files with these; a command's own
output file (`eval --output`, `generate --output`, ...) goes through `write_output`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from preftune.errors import PreftuneError

TMP = ".tmp-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def link_error(path: Path, fix: str = "choose another --output-dir") -> PreftuneError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return PreftuneError(f"{path} is a symbolic link{target}; preftune never writes, renames or deletes through a "
                         f"link in a run folder: remove the link or {fix}.")


def write_failure(exc: BaseException, folder: Path) -> tuple[str, str] | None:
    """(what went wrong, what to do) when a write failed for a reason the user can fix, else None (a bug)."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    codes = {getattr(x, "errno", None) for x in chain}
    text = " ".join(str(x) for x in chain)
    if errno.ENOSPC in codes or "No space left on device" in text or "os error 28" in text:
        return "the disk filled", "free space"
    if errno.EDQUOT in codes or "Disk quota exceeded" in text or "os error 122" in text:
        return "the disk quota was exceeded", "free space"
    if errno.EROFS in codes:
        return "the file system is read-only", "choose a writable --output-dir"
    if codes & {errno.EACCES, errno.EPERM}:
        return "permission was denied", "make the folder writable"
    # torch.save's C++ writer reports a full disk as "unexpected pos N vs M", without an errno: look at the disk.
    if isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError":
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 16 << 20:
                return "the disk filled", "free space"
    return None


def replace_text(path: Path, text: str | bytes, fix: str = "choose another --output-dir", *, durable: bool = False,
                 unique: bool = False) -> None:
    """Write a whole file atomically (readers see the old or the new content), never through a link. `durable`:
    on disk before it replaces the old file (fsync: a file the next write builds on, such as pairs' rows);
    `unique`: a temporary name of this process's own, for a file several processes of one launch write at once
    with the same content."""
    if path.is_symlink():
        raise link_error(path, fix)
    tmp = path.with_name(TMP + path.name + (f"-{os.getpid()}" if unique else ""))
    if tmp.is_symlink():
        raise link_error(tmp, fix)
    tmp.unlink(missing_ok=True)  # a leftover of a crash
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_output(path: str | Path, data: str | bytes, what: str, flag: str = "--output") -> Path:
    """A command's own output file (`eval/generate/inspect --output`, `report --output-dir`), written like a run
    file: its folder made, the file replaced atomically and never through a link (a link at the name is refused,
    naming it; a stream such as /dev/stdout is written as is); a full disk or an unwritable folder is one
    sentence."""
    path = Path(path).expanduser()
    try:
        if path.exists() and not path.resolve().is_file() and not path.is_dir():  # a terminal, a pipe
            with open(path, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, data, fix=f"pass another {flag}")
    except OSError as e:
        failure = write_failure(e, path.parent)
        raise PreftuneError(f"cannot write {what} to {path}: {failure[0] if failure else e.strerror or e}; "
                            f"{failure[1] + ' or ' if failure else ''}pass another {flag}.") from None
    return path


@contextlib.contextmanager
def writing(what: str, folder: Path, then: str) -> Iterator[None]:
    """Around a command's writes: an OSError (a full disk, a quota, a read-only or unwritable folder, or another
    reason) becomes one sentence saying what was being written, why it failed and `then` (what to do)."""
    try:
        yield
    except OSError as e:
        failure = write_failure(e, folder)
        why = failure[0] if failure else (e.strerror or str(e))
        raise PreftuneError(f"cannot write {what}: {why}; {failure[1] + ' and ' if failure else ''}{then}.") from None


def append_text(path: Path, text: str, fix: str = "choose another --output-dir", *, durable: bool = False) -> None:
    """Append to a file, never through a link (O_NOFOLLOW: a link at the name, even a dangling one, is refused,
    naming it); a failed append is cut back, so the file keeps whole lines. `durable`: on disk before this
    returns (fsync)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise link_error(path, fix) from None
        raise
    size = os.fstat(fd).st_size
    try:
        data = text.encode("utf-8")
        while data:  # (a regular file takes a write whole unless the disk fills, which raises)
            data = data[os.write(fd, data):]
        if durable:
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    finally:
        os.close(fd)
