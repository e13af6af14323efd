"""One writer per run directory: an exclusive lock taken before anything is written into it.

The lock is `fcntl.flock` on `<output-dir>/.lock`, held for the run's whole life: the kernel
releases it when the holder exits, SIGKILL included, so a lock left by a dead process on this
host is simply taken over. The file records the holder (host, pid, start time) for the message
a second run gets. On network filesystems flock may be emulated or not released at once; the
recorded holder then tells the user whom to look for. Only the process that writes the
directory takes it (the global main process, or each node's with node-local directories).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ddp_utils.errors import InputError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        """Take the lock of `folder` or raise `InputError` naming its holder."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise in_use(folder, holder) from None
        os.ftruncate(fd, 0)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Give the directory back (also done by the kernel when the process ends)."""
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


def in_use(folder: Path, holder: str) -> InputError:
    return InputError(
        f"{folder} is in use by another run ({holder}): two runs would overwrite each "
        "other's checkpoints and logs. Wait for it to end, stop it, or choose another "
        "output directory",
        "output_dir",
    )


def check_not_in_use(folder: Path) -> None:
    """Refuse a folder another run holds, taking and writing nothing: a run says so before
    it reads the folder's checkpoints (and says it resumes from one). The lock itself is taken
    later (`RunLock.acquire`), and refuses a run that started in between."""
    holder = lock_holder(folder)
    if holder is not None:
        raise in_use(folder, holder)


def lock_holder(folder: Path) -> str | None:
    """Who holds `folder`'s lock (a run training there), or None; takes and writes nothing
    (a shared lock probed and dropped at once)."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # no lock file: no run ever wrote here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_read_holder(fd))
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    text = f"pid {holder.get('pid')} on host {holder.get('host')}, since {since}"
    if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
        text += "; that process has ended, so a process it started still holds the lock"
    return text


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
