"""The run folder's lock: one run at a time per folder.

`OUTPUT_DIR/.preftune.lock` exists while a run uses the folder. It is created atomically with its content (a
hard link from a private temporary file: the link fails if the lock exists, and unlike O_EXCL this is atomic on
NFS too), and holds who made it: process id, host name, the process's start time, the machine's boot id and its
PID namespace. Only the main process of a multi-process job takes it (the others never write the run's files).

While held, a background thread refreshes the lock's modification time every HEARTBEAT_S seconds.

A lock is stale, and is taken over with one line saying so, when
- it was made on this machine (same host, boot and PID namespace) by a process that is no longer running (or
  whose PID now belongs to a newer process), or
- it was made elsewhere (another host on a shared filesystem, another container, before a reboot), where its
  process cannot be checked from here, and has not been refreshed for STALE_AFTER_S seconds: its run is gone
  (a job requeued on another node after its node died continues on its own, after that wait).
Otherwise the run is refused with the holder's host, PID and last refresh. The lock is released when the run
ends, however it ends (a `kill -9` or a lost machine leaves it behind, found stale as above). A run stopped
(SIGSTOP) for longer than STALE_AFTER_S loses its lock to a new run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

LOCK = ".preftune.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # ten missed heartbeats: far beyond a slow shared filesystem or a long pause


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot; Linux), to tell a reused PID from the original."""
    stat = _read(f"/proc/{pid}/stat")
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing parenthesis.
    return stat.rsplit(")", 1)[1].split()[19] if stat and ")" in stat else None


def _me() -> dict[str, Any]:
    pid = os.getpid()
    ns = None
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid),
            "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": ns,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OSError, OverflowError):
        return False
    return True


class RunLock:
    """The lock file of one run folder: `check` (read only), `acquire`, `release`."""

    def __init__(self, path: Path):
        self.path = path
        self.token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        """The lock's content; None when there is no lock, {} when it is unreadable."""
        if not self.path.exists() and not self.path.is_symlink():
            return None
        try:
            info = json.loads(self.path.read_text(encoding="utf-8")[:4096])
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def age(self) -> float:
        """Seconds since the lock was last refreshed (0 when it cannot be read)."""
        try:
            return max(0.0, time.time() - self.path.stat().st_mtime)
        except OSError:
            return 0.0

    def stale(self, info: dict[str, Any]) -> bool:
        """True when the run that made the lock has ended: gone from this machine, or silent for STALE_AFTER_S."""
        me = _me()
        pid = info.get("pid")
        here = (isinstance(pid, int) and info.get("host") == me["host"] and info.get("pidns") == me["pidns"]
                and info.get("boot") == me["boot"])
        if not here:  # its process cannot be looked at from here: only its silence tells
            return self.age() > STALE_AFTER_S
        if not _running(pid):
            return True
        return bool(info.get("start")) and _start_time(pid) not in (None, info["start"])

    def _busy(self, info: dict[str, Any]) -> PreftuneError:
        folder = self.path.parent
        if not info:
            return PreftuneError(f"output_dir {folder} is locked by another run ({self.path} is unreadable); if no "
                                 f"run uses the folder, delete {self.path}.")
        where = "this machine" if info.get("host") == socket.gethostname() else f"host {info.get('host')}"
        return PreftuneError(f"output_dir {folder} is in use by another preftune run (process {info.get('pid')} on "
                             f"{where}, since {info.get('since')}, alive {self.age():.0f} s ago); wait for it to end "
                             f"or choose another --output-dir (a lock silent for {STALE_AFTER_S / 60:.0f} minutes "
                             f"is taken over; if you know that run is gone, delete {self.path}).")

    def check(self) -> None:
        """Refuse early (before the data and model load) when a live run holds the folder; writes nothing."""
        info = self.holder()
        if info is not None and not self.stale(info):
            raise self._busy(info)

    def acquire(self, say: Callable[[str], None] = print) -> None:
        me = _me()
        text = json.dumps(me)
        for _ in range(3):  # a stale lock removed by us (or by another process) lets the next attempt succeed
            if self._create(text):
                self.token = me["token"]
                self._stop.clear()
                self._beat = threading.Thread(target=self._heartbeat, name="preftune-lock", daemon=True)
                self._beat.start()
                return
            info = self.holder()
            if info is None:
                continue  # released between our attempt and the read
            if not self.stale(info):
                raise self._busy(info)
            why = (f"not refreshed for {self.age() / 60:.0f} minutes" if info.get("host") != me["host"]
                   or info.get("boot") != me["boot"] or info.get("pidns") != me["pidns"] else "no longer running")
            self._remove_stale(info)
            say(f"removed a stale lock of process {info.get('pid')} on {info.get('host')} ({why}) from "
                f"{self.path.parent}")
        raise self._busy(self.holder() or {})

    def _create(self, text: str) -> bool:
        tmp = self.path.with_name(f".tmp-lock-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: O_EXCL instead (atomic on local disks, NFS v3+)
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                                 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                return True
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_stale(self, info: dict[str, Any]) -> None:
        # Remove the file only if it is still the stale one we read: two runs finding the same stale lock must
        # not both remove it, or the second would remove the lock the first has just made.
        if self.holder() == info:
            self.path.unlink(missing_ok=True)

    def held(self) -> bool:
        """Whether the lock file is still this process's (False once the folder is deleted or moved away)."""
        return self.token is not None and (self.holder() or {}).get("token") == self.token

    def touch(self) -> None:
        """Refresh the lock's time, if it is still ours."""
        if self.token is not None and (self.holder() or {}).get("token") == self.token:
            try:
                os.utime(self.path)
            except OSError:  # a vanished lock or a flaky filesystem: the next beat tries again
                pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.touch()

    def release(self) -> None:
        """Remove the lock if this process holds it (never another run's)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.token is not None and (self.holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None
