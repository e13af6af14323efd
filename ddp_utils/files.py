"""Publishing files and folders atomically: a reader (or a crash) never meets half of one.

Everything a run writes for others to read (checkpoints, exports, the resolved config, the
image cache, FID statistics, samples) is first written under a hidden temporary name beside
its destination, flushed to disk, then renamed over it. Temporary names carry the host, the
process id and a random part, so two writers (two nodes on a shared filesystem) never share
one, and a writer only ever removes temporaries of its own.

    with atomic_file(path) as f:        # a file: write to f, then it replaces `path`
        f.write(data)
    with atomic_dir(folder) as tmp:     # a folder: fill tmp, then it replaces `folder`
        model.save_pretrained(tmp)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import xxhash

CHECKSUM = "xxh3_128"  # the checksum recorded for checkpoint and export files


def format_bytes(num_bytes: float) -> str:
    """A size for people, in decimal units to three figures: 0 bytes, 512 kB, 1.5 MB, 42 GB."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(num_bytes) < 999.5 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.3g} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def checksum(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def file_checksum(path: Path, chunk_bytes: int = 64 << 20) -> str:
    """`checksum` of a file's content, read in chunks (a shard of a large model need not fit
    in memory twice)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def unique_suffix() -> str:
    """`<host>-<pid>-<random>`: part of every temporary name this process makes."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `path` that no other writer uses: `.<name>.<kind>-<host>-<pid>-<rand>`."""
    return path.with_name(f".{path.name}.{kind}-{unique_suffix()}")


def is_temp_of(candidate: Path, path: Path) -> bool:
    """Whether `candidate` is a temporary name (any writer's) made for `path`."""
    return candidate.name.startswith(f".{path.name}.")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (directory entries are data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The process's umask, read once at import (reading it means setting it, briefly).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file: 0o644 under the usual umask


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, and `root` itself; files get the mode a
    plain `open` would have given them (safetensors writes 0600: a group could not read an
    export or checkpoint it shares)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            os.chmod(path, FILE_MODE)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write `path` through a temporary file that replaces it only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        # Not there when the open failed; a read-only folder refuses even that: the error to
        # report is the open's, not the cleanup's.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


# Linux renameat2(RENAME_EXCHANGE) swaps two paths in one step; elsewhere (or on filesystems
# without it) the old folder is renamed aside first, a window of microseconds without either.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.renameat2  # noqa: B018 - glibc >= 2.28
    except (OSError, AttributeError, TypeError):
        return None
    return libc


_LIBC = _libc()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot."""
    if _LIBC is None:
        return False
    result = _LIBC.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def publish_dir(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` in place of `path` (which may exist), durably."""
    fsync_tree(tmp)
    if not path.exists():
        tmp.rename(path)
    elif exchange(tmp, path):
        shutil.rmtree(tmp)  # now holds the old folder
    else:
        old = temp_path(path, "old")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary folder; it replaces `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
