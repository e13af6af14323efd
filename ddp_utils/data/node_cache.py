"""Arrays encoded once per node, shared by its processes, resumable, memory-mapped: what the
latent cache (`latent_cache.py`) and the text cache (`text_cache.py`) are built with.

A cache is a folder of raw `.npy` arrays and a `manifest.json` (written last: a folder without
it is not a cache). It is built in a build folder beside it, `<name>.partial/`, by the node's
processes without a collective (encoding ImageNet outlasts a barrier's timeout): chunk k of
the rows is encoded by local process k % L (of the L on the node), on its own device, straight
into full-size arrays, and recorded once flushed (`chunks/<k>.json`, holding what the chunk's
encoder reports). The local main process lays the folder out (`layout.json` last; the others
poll for it), waits for every chunk's record, then finishes and publishes the cache (the
manifest last, the folder renamed into place). It holds `<name>.lock` meanwhile: a second job
on the node waits for the first. A build that was interrupted is continued by the next run
with the same key, on any number of processes: recorded chunks are not encoded again. One
whose layout does not fit this build is started over, with a warning.

A kind of cache fills in a `NodeBuild` (its rows, arrays, layout, whether the cache is
published already), an `encode(arrays, chunks, progress)` and a `finish(progress)`, and hands
them to `share_build`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from ddp_utils.distributed import local_share
from ddp_utils.files import publish_dir, temp_path, write_json

logger = logging.getLogger("ddp_diffusion")

MANIFEST = "manifest.json"
PARTIAL = ".partial"  # the build folder: `<cache>.partial`, beside the cache
LAYOUT = "layout.json"  # in the build folder, written once its arrays exist
CHUNKS = "chunks"  # in the build folder: one record per chunk encoded
COMPACTED = "compacted"  # in the build folder: arrays cut to the rows kept (rows skipped)
CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class NodeBuild:
    """One cache being encoded by the node's processes. A kind of cache sets `key`, `folder`
    and the properties below (read when called: tests shrink the chunks and the waits)."""

    key: str
    folder: Path  # the cache, once published
    what: str = "cache"  # in log lines: "latents", "text"
    unit: str = "rows"  # what a row is, in log lines: "images", "captions"

    @property
    def num_rows(self) -> int:  # the arrays' rows while building
        raise NotImplementedError

    @property
    def chunk_size(self) -> int:  # rows per chunk: the unit of work shared and resumed
        raise NotImplementedError

    @property
    def wait_seconds(self) -> float:  # how often processes poll for each other's files
        raise NotImplementedError

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each array's name, full shape while building, and dtype."""
        raise NotImplementedError

    def layout(self) -> dict[str, Any]:
        """What the layout marker records: a build folder is continued only by a build of the
        same layout (chunks mean the same rows only for the same chunk size)."""
        raise NotImplementedError

    def is_published(self) -> bool:
        """Whether the cache is there, readable, of this key."""
        raise NotImplementedError

    @property
    def partial(self) -> Path:
        return self.folder.with_name(f"{self.folder.name}{PARTIAL}")

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_size)

    def chunk_rows(self, chunk: int) -> range:
        size = self.chunk_size
        return range(chunk * size, min(self.num_rows, (chunk + 1) * size))

    def num_bytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.arrays().values())


def first_nonfinite_row(array: np.ndarray, rows_per_read: int = 4096) -> int | None:
    """The first row of `array` holding NaN/inf, or None; read `rows_per_read` rows at a time."""
    for start in range(0, len(array), rows_per_read):
        part = np.asarray(array[start : start + rows_per_read])
        finite = np.isfinite(part).reshape(len(part), -1).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


def disk_free(folder: Path) -> int:
    """Bytes free for a new file in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def bytes_on_disk(folder: Path) -> int:
    """Bytes the arrays in `folder` hold on disk (a build folder's: its arrays are sparse
    files, filled as chunks are written; those compacted already)."""
    total = 0
    for path in folder.rglob("*.npy"):
        with contextlib.suppress(FileNotFoundError):  # the folder was published meanwhile
            total += path.stat().st_blocks * 512
    return total


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the lock on building `folder` (flock: the kernel releases it when the holder
    exits, SIGKILL included, so an interrupted build never leaves it held)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f"{folder.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_problem(build: NodeBuild) -> str | None:
    """Why the build folder cannot be continued by this build (None when it can): no layout
    marker, another layout, or an array of another shape, dtype or size. Every process reads
    the same files, so they all agree."""
    marker = build.partial / LAYOUT
    if not marker.is_file():
        return "no layout marker"
    try:
        layout = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        return f"its layout marker is unreadable ({err})"
    if layout != build.layout():
        return f"its layout is {layout}, this build's {build.layout()}"
    for name, (shape, dtype) in build.arrays().items():
        if (build.partial / COMPACTED / f"{name}.npy").is_file():  # every chunk was recorded
            continue
        path = build.partial / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            size = path.stat().st_size
        except (OSError, ValueError) as err:
            return f"{path.name} is unreadable ({err})"
        if array.shape != shape or array.dtype != dtype or size != array.offset + array.nbytes:
            return f"{path.name} holds {array.dtype} {array.shape} in {size} bytes"
    return None


def map_build(build: NodeBuild) -> dict[str, np.memmap]:
    """The build folder's arrays, mapped for writing (every process maps the same files); not
    those compacted already (every chunk is recorded then: nothing is left to write)."""
    paths = {name: build.partial / f"{name}.npy" for name in build.arrays()}
    return {
        name: np.lib.format.open_memmap(path, "r+") for name, path in paths.items()
        if path.is_file()
    }  # fmt: skip


def open_build(build: NodeBuild) -> dict[str, np.memmap]:
    """For the local main process: the arrays of an interrupted build of this cache (its
    recorded chunks are kept), else of a new build folder, which replaces one that does not
    fit (with a warning)."""
    problem = build_problem(build)
    if problem is None:
        logger.info("%s: continuing the interrupted encoding in %s (%d of %d chunks done)",
                    build.what, build.partial, len(recorded_chunks(build)),
                    build.num_chunks)  # fmt: skip
        return map_build(build)
    if build.partial.exists():
        logger.warning("%s: %s cannot be continued (%s); starting it over",
                       build.what, build.partial, problem)  # fmt: skip
        discard(build.partial)
    # Filled under a temporary name and renamed: a waiting process never meets half of it.
    tmp = temp_path(build.partial)
    tmp.mkdir()
    for name, (shape, dtype) in build.arrays().items():  # sparse files: filled as rows come
        np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, shape)
    (tmp / CHUNKS).mkdir()
    write_json(tmp / LAYOUT, build.layout())
    tmp.rename(build.partial)
    return map_build(build)


def discard(folder: Path) -> None:
    """Remove `folder`, renamed aside first: nobody meets a half-removed one."""
    aside = temp_path(folder, "old")
    folder.rename(aside)
    shutil.rmtree(aside)


def join_build(build: NodeBuild, mine: list[int]) -> dict[str, np.memmap] | None:
    """For the other processes: wait (polling) until the local main process has laid out the
    build folder, then map its arrays; None when the cache was published meanwhile or none of
    `mine` is left to encode."""
    while not build.is_published():
        if build_problem(build) is None:
            # All recorded (an interrupted build): the main process may be publishing it.
            return map_build(build) if pending(build, mine) else None
        time.sleep(build.wait_seconds)
    return None


def recorded_chunks(build: NodeBuild) -> set[int]:
    """The chunks whose rows are in the build folder's arrays (flushed before recording)."""
    folder = build.partial / CHUNKS
    names = [path.name for path in folder.iterdir()] if folder.is_dir() else []
    # Temporary names of records being written are hidden (".000012.json.tmp-...").
    return {int(name[: -len(".json")]) for name in names if name.endswith(".json")
            and not name.startswith(".")}  # fmt: skip


def pending(build: NodeBuild, chunks: list[int]) -> list[int]:
    done = recorded_chunks(build)
    return [k for k in chunks if k not in done]


def chunk_record_path(build: NodeBuild, chunk: int) -> Path:
    return build.partial / CHUNKS / f"{chunk:06d}.json"


def record_chunk(build: NodeBuild, chunk: int, record: dict[str, Any]) -> None:
    """Record chunk `chunk` as encoded (its rows flushed already), with what its encoder
    reports (sums, rows skipped)."""
    write_json(chunk_record_path(build, chunk), record)


def chunk_records(build: NodeBuild, progress: EncodeProgress) -> list[dict[str, Any]]:
    """Every chunk's record, in chunk order, once all are written (polled: the other processes'
    too)."""
    while len(recorded_chunks(build)) < build.num_chunks:
        progress.log()
        time.sleep(build.wait_seconds)
    return [json.loads(chunk_record_path(build, k).read_text()) for k in range(build.num_chunks)]


class EncodeProgress:
    """The local main process's log of the node's progress (every process's recorded chunks),
    at most once a minute: ImageNet takes a while."""

    def __init__(self, build: NodeBuild) -> None:
        self.build = build
        self.began = self.reported = time.monotonic()
        self.rows_before = self.rows_done()  # an interrupted build's

    def rows_done(self) -> int:
        return sum(len(self.build.chunk_rows(k)) for k in recorded_chunks(self.build))

    def log(self) -> None:
        if time.monotonic() - self.reported < 60:
            return
        self.reported = time.monotonic()
        done = self.rows_done()
        rate = (done - self.rows_before) / (self.reported - self.began)
        logger.info("%s: %d of %d %s encoded (%.0f %s/s)", self.build.what, done,
                    self.build.num_rows, self.build.unit, rate, self.build.unit)  # fmt: skip


def publish_build(build: NodeBuild, manifest: dict[str, Any]) -> None:
    """The build folder becomes the cache: its manifest written last, renamed into place, the
    build's bookkeeping removed."""
    write_json(build.partial / MANIFEST, manifest)
    publish_dir(build.partial, build.folder)
    shutil.rmtree(build.folder / CHUNKS)  # the build's bookkeeping, no longer needed
    (build.folder / LAYOUT).unlink()


def wait_for_cache(build: NodeBuild) -> None:
    """Wait, without any collective, until this node's local main process has published the
    cache: encoding ImageNet takes hours, and a barrier (NCCL's) gives up after its timeout
    (10 minutes by default). Should a process die, the launcher stops this one."""
    began = reported = time.monotonic()
    while not build.is_published():
        if time.monotonic() - reported > 600:
            reported = time.monotonic()
            logger.info("%s: waited %.0f min for the node to encode %s",
                        build.what, (reported - began) / 60, build.folder)  # fmt: skip
        time.sleep(build.wait_seconds)


Encode = Callable[[dict[str, np.memmap], list[int], "EncodeProgress | None"], None]


def share_build(
    build: NodeBuild,
    accelerator: Accelerator | None,
    encode: Encode,
    finish: Callable[[EncodeProgress], None],
) -> None:
    """This process's share of the node's encoding: chunk k is encoded by local process k % L
    (`encode(arrays, chunks, progress)`: encode and record each of `chunks` into the mapped
    arrays; progress is the main process's), the local main process lays the folder out, then
    `finish(progress)` publishes the cache. Returns once the cache is published. Nothing here
    is a collective."""
    rank, num_local = local_share(accelerator)
    # A process the launcher left out of LOCAL_WORLD_SIZE (rank >= L) has no share: it waits.
    mine = list(range(rank, build.num_chunks, num_local)) if rank < num_local else []
    if rank != 0:
        arrays = join_build(build, mine) if mine else None
        if arrays is not None:
            encode(arrays, pending(build, mine), None)
        del arrays  # unmapped: its rows are flushed, the files about to be published
        wait_for_cache(build)
        return
    # A second job on this node building the same cache waits here for the first, instead of
    # publishing (and removing) the folder the first is still building in.
    with build_lock(build.folder):
        if build.is_published():
            logger.info("%s: reading %s", build.what, build.folder)
            return
        logger.info("%s: encoding %d %s once into %s, shared by %d process(es)", build.what,
                    build.num_rows, build.unit, build.folder, num_local)  # fmt: skip
        arrays = open_build(build)
        progress = EncodeProgress(build)
        encode(arrays, pending(build, mine), progress)
        del arrays  # unmapped: this process's rows are flushed
        finish(progress)
