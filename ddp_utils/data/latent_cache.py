"""The latent cache: a decoded dataset encoded once per node into latents, cached like the
decoded images (its batches: `ddp_utils.data.batches.LatentBatches`).

Generic over an `Encoder` (what has a fingerprint and turns float images into a posterior's
mean and standard deviation; `diffusion.codecs.LatentCodec` is one). The cache is keyed by the
data's fingerprint (source, resolution, channels, crop), the encoder's (its weights), the flip
policy and the stored dtype; it is checked by every process and rebuilt (with a warning) when
it is damaged or stale.

The cache is a folder of raw `.npy` arrays (`mean.npy`, `std.npy`, with flips
`flipped_mean.npy`, `flipped_std.npy`) and a `manifest.json` (key, shape, dtype, file sizes).
Every process maps the files read-only (`np.load(mmap_mode="r")`): the page cache holds one
copy per node, shared by its processes, and only the rows a batch touches are read.
ImageNet-256 through an 8x VAE is 42 GB in float16 with flips: it never has to fit in a
process's memory, nor on a device.

Non-finite latents are never trained on (they would end the run as "diverged"): an encoding
that holds NaN/inf (a VAE overflowing in float16, or beyond float16's range once stored) is
refused as it is written; a cache damaged on disk since is found when it is read, by its
values up to SCAN_BYTES (then rebuilt, like any damaged cache), and beyond that by the batches
(`ddp_utils.data.batches.LatentBatches`), which check the rows they gather and name the cache.

The node's processes share the encoding, without a collective (it outlasts a barrier's
timeout): chunk k of ENCODE_ROWS source rows is encoded by local process k % L (of the L on the
node), on its own device, straight into full-size arrays in a build folder beside the cache,
`latents-<key>.partial/`, and recorded there once flushed (`chunks/<k>.json`: its float64
sums for the variance, the rows it skipped). The local main process lays the folder out
(`layout.json` last; the others poll for it), waits for every chunk's record, then publishes
the cache: the kept rows in source order, the manifest last, the folder renamed into place.
(It holds `latents-<key>.lock` meanwhile: a second job on the node waits for the first.)
A build that was interrupted is continued by the next run with the same key, on any number
of processes: recorded chunks are not encoded again. One whose layout does not fit this build
(another ENCODE_ROWS, a damaged array) is started over, with a warning. The chunks, and the
order their sums are added in, do not depend on the number of processes: nor does the cache,
where every device encodes a chunk to the same bits (the same kind of device and kernels).
That machinery, shared with the text cache, is `ddp_utils.data.node_cache`; what is the
latents' own is here (the images of a chunk, the variance, rows skipped and compacted).

With random flips, both the images and their mirror images are encoded, so a flip in latent
space is the encoding of the flipped image, exactly. A batch draws z = mean + std * eps with
the micro-step's seeded generator (the flip first, then eps, as the pixel path draws its
flip): resume stays exact and a sample of the posterior is fresh at every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.data.decode import CACHE_VARIABLE, cache_fix, decode_all, default_cache_dir
from ddp_utils.data.load import ImageData, StreamSource, first_errors
from ddp_utils.data.node_cache import (
    CANNOT_WRITE,
    COMPACTED,
    MANIFEST,
    EncodeProgress,
    NodeBuild,
    bytes_on_disk,
    chunk_records,
    discard,
    disk_free,
    first_nonfinite_row,
    publish_build,
    record_chunk,
    share_build,
)
from ddp_utils.errors import InputError, OutputError
from ddp_utils.files import format_bytes, publish_dir, temp_path, write_json

logger = logging.getLogger("ddp_diffusion")

LATENT_CACHE_VERSION = 2  # 1: one .npz of float32 arrays, loaded whole (now ignored)
PIXEL_RANGE = (-1.0, 1.0)  # what encoders are given
# Source rows per chunk: the unit of work shared among the node's processes, recorded and
# resumed; also the images converted to float and handed to the encoder at a time.
ENCODE_ROWS = 4096
DECODE_ROWS = 256  # rows a DataLoader worker decodes at a time, for a streamed dataset
CacheDtype = Literal["float16", "float32"]
WAIT_SECONDS = 5.0  # how often processes poll for the build folder, chunk records, the cache
# A cache up to this size has its values checked at every read (about a second); a larger one
# by the rows each batch gathers (reading 42 GB at every start would cost minutes).
SCAN_BYTES = 2 * 2**30


class Encoder(Protocol):
    fingerprint: str  # changes whenever the encoding would (weights, dtype)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std), float32 on the CPU, of float images in [-1, 1]."""
        ...


@dataclass
class LatentData:
    """Posterior mean and std of every image ((N, c, h, w) arrays mapped from the cache, in its
    dtype), of the mirror images too when flips are on; the variance of a posterior sample over
    the data (Var(mean) + E[std^2], measured in float32 while encoding); and the affine map a
    batch applies: z = (sample - shift) * scale (floats, or per-channel (c, 1, 1) tensors on
    the batches' device)."""

    mean: np.ndarray
    std: np.ndarray
    flipped_mean: np.ndarray | None
    flipped_std: np.ndarray | None
    folder: Path
    variance: float
    labels: torch.Tensor | None = None  # int64 (N,): each row's class (or caption row)
    condition_name: str = "class_labels"  # the name batches give `labels` in their condition
    scale: float | torch.Tensor = 1.0
    shift: float | torch.Tensor = 0.0

    def means(self, num: int) -> torch.Tensor:
        """The posterior means of the first `num` images, float32 on the CPU."""
        return torch.from_numpy(np.asarray(self.mean[:num], dtype=np.float32))


def latent_cache_key(
    data: ImageData, encoder: Encoder, random_flip: bool, dtype: CacheDtype = "float16"
) -> str:
    key = {
        "version": LATENT_CACHE_VERSION,
        "data": data.fingerprint,
        "num_images": data.num_images,
        "encoder": encoder.fingerprint,
        "flips": random_flip,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def array_names(random_flip: bool) -> list[str]:
    return ["mean", "std"] + (["flipped_mean", "flipped_std"] if random_flip else [])


def read_latent_cache(folder: Path, key: str, warn: bool = True) -> LatentData | None:
    """The cached arrays, memory-mapped, or None when missing, stale or damaged (then it is
    rebuilt). Checks the manifest against each file's header (shape, dtype) and size, and the
    values for NaN/inf when the arrays hold at most SCAN_BYTES (larger ones: their batches)."""
    if not (folder / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("key") != key:
            return None
        shape, dtype = tuple(manifest["shape"]), np.dtype(manifest["dtype"])
        arrays = {}
        for name, size in manifest["sizes"].items():
            path = folder / f"{name}.npy"
            if path.stat().st_size != size:
                raise ValueError(f"{path.name} has {path.stat().st_size} bytes, not {size}")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(
                    f"{path.name} holds {array.dtype} {array.shape}, not {dtype} {shape}"
                )
            arrays[name] = array
        if not math.isfinite(float(manifest["variance"])):
            raise ValueError(f"its variance is {manifest['variance']}: the latents hold NaN/inf")
        if sum(array.nbytes for array in arrays.values()) <= SCAN_BYTES:
            for name, array in arrays.items():
                row = first_nonfinite_row(array, ENCODE_ROWS)
                if row is not None:
                    raise ValueError(f"{name}.npy holds non-finite values (NaN/inf) in row {row}")
        return LatentData(
            arrays["mean"],
            arrays["std"],
            arrays.get("flipped_mean"),
            arrays.get("flipped_std"),
            folder,
            float(manifest["variance"]),
        )
    except (OSError, KeyError, TypeError, ValueError) as err:
        if warn:
            logger.warning("latent cache %s is damaged (%s); rebuilding it", folder, err)
        return None


def check_cache_space(num_bytes: int, folder: Path) -> None:
    """Refuse a cache the disk cannot hold, before encoding any of it."""
    free = disk_free(folder)
    if num_bytes > free:
        needed, available = format_bytes(num_bytes), format_bytes(free)
        if needed == available:  # 8.19 kB and 8.19 kB: the bytes say which is more
            needed, available = f"{num_bytes:,} bytes", f"{free:,} bytes"
        raise InputError(
            f"the latent cache needs {needed} in {folder} and only {available} are free: "
            f"set {CACHE_VARIABLE} to a folder on a larger "
            "disk (a node-local SSD: every node writes its own copy), or train on fewer images"
        )


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    low, high = PIXEL_RANGE
    return images.to(torch.float32) * ((high - low) / 255.0) + low


@dataclass
class LatentBuild(NodeBuild):
    """One latent cache being encoded by the node's processes (`ddp_utils.data.node_cache`):
    what goes in, where it is built (`partial`, beside the cache, kept when the build is
    interrupted) and its layout."""

    data: ImageData
    encoder: Encoder
    random_flip: bool
    dtype: CacheDtype
    key: str
    folder: Path  # the cache, once published
    latent_shape: tuple[int, ...]
    what = "latents"
    unit = "images"

    @property
    def num_rows(self) -> int:  # source rows: the arrays' rows while building
        return self.data.num_images

    @property
    def chunk_size(self) -> int:
        return ENCODE_ROWS

    @property
    def wait_seconds(self) -> float:
        return WAIT_SECONDS

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        shape = (self.num_rows, *self.latent_shape)
        return {name: (shape, np.dtype(self.dtype)) for name in array_names(self.random_flip)}

    def layout(self) -> dict[str, Any]:
        return {
            "key": self.key, "version": LATENT_CACHE_VERSION,
            "shape": [self.num_rows, *self.latent_shape], "dtype": self.dtype,
            "arrays": array_names(self.random_flip), "encode_rows": ENCODE_ROWS,
        }  # fmt: skip

    def is_published(self) -> bool:
        return read_latent_cache(self.folder, self.key, warn=False) is not None


@dataclass
class ChunkImages:
    """The readable images of one chunk of source rows, and the rows left out of it."""

    index: int
    images: np.ndarray | torch.Tensor  # uint8 (n, C, H, W), n <= ENCODE_ROWS
    skipped: list[str]  # the unreadable rows' names, with the error
    skipped_rows: list[int]  # and their source rows


def encode_share(build: LatentBuild, accelerator: Accelerator | None, num_workers: int) -> None:
    """This process's share of the node's encoding (`node_cache.share_build`): chunk k
    (source rows k*ENCODE_ROWS..) is encoded by local process k % L into the build folder's
    arrays; the local main process lays the folder out, then publishes the cache. Returns once
    the cache is published."""
    share_build(
        build,
        accelerator,
        lambda arrays, chunks, progress: encode_chunks(
            build, arrays, chunks, num_workers, progress
        ),
        lambda progress: finish_build(build, progress),
    )


def chunk_images(
    data: ImageData, build: LatentBuild, chunks: list[int], num_workers: int
) -> Iterator[ChunkImages]:
    """The images of `chunks`, in that order: sliced from memory, or decoded from the stream."""
    if data.stream is not None:
        yield from decoded_chunks(data.stream, chunks, num_workers)
        return
    for k in chunks:
        rows = build.chunk_rows(k)
        yield ChunkImages(k, data.images[rows.start : rows.stop], [], [])


def encode_chunks(
    build: LatentBuild, arrays: dict[str, np.memmap], chunks: list[int], num_workers: int,
    progress: EncodeProgress | None = None,
) -> None:  # fmt: skip
    """Encode `chunks` into the arrays and record each, once its rows are flushed, with its
    float64 sums (combined in chunk order at the end: the variance is the same bits whatever
    the number of processes) and the rows it left out."""
    if not chunks:
        return
    for chunk in chunk_images(build.data, build, chunks, num_workers):
        sums = encode_chunk(build, arrays, chunk)
        record_chunk(build, chunk.index, {
            "rows": len(chunk.images), **sums,
            "skipped": chunk.skipped, "skipped_rows": chunk.skipped_rows,
        })  # fmt: skip
        if progress is not None:
            progress.log()


def encode_chunk(
    build: LatentBuild, arrays: dict[str, np.memmap], chunk: ChunkImages
) -> dict[str, float]:
    """Encode a chunk's images (and mirror images, with flips) into the first rows of its place
    in the arrays, flushed to disk; its sums of mean, mean^2 and std^2 (in float64, from the
    float32 encodings) for Var(mean) + E[std^2] over the data."""
    sums = {"sum": 0.0, "sum_sq": 0.0, "sum_var": 0.0}
    if len(chunk.images) == 0:  # every row unreadable
        return sums
    start = chunk.index * ENCODE_ROWS
    pixels = to_pixels(torch.as_tensor(chunk.images))
    views = {"": pixels, "flipped_": pixels.flip(3)} if build.random_flip else {"": pixels}
    for prefix, view in views.items():
        mean, std = build.encoder.encode(view)
        for name, values in ((f"{prefix}mean", mean), (f"{prefix}std", std)):
            stored = arrays[name][start : start + len(values)]
            stored[:] = values.numpy()
            # As stored: float16 overflows beyond 65504.
            row = first_nonfinite_row(stored, ENCODE_ROWS)
            if row is not None:
                source = getattr(build.encoder, "source", None)  # a codec's --vae
                raise InputError(
                    f"the encoder{f' {source}' if source else ''} gave non-finite "
                    f"latents (NaN/inf) in {name} for image {start + row} of the data, in "
                    f"{build.dtype}: nothing of it is cached. A VAE overflowing in float16 "
                    "does this (train in bf16 or fp32: --mixed-precision), or its weights are "
                    "broken"
                )
        if not prefix:
            sums = {
                "sum": mean.double().sum().item(),
                "sum_sq": mean.double().square().sum().item(),
                "sum_var": std.double().square().sum().item(),
            }
    for array in arrays.values():
        array.flush()
    return sums


def finish_build(build: LatentBuild, progress: EncodeProgress) -> None:
    """Once every chunk is recorded (polled: the other processes' too), the cache: the kept
    rows in source order, the manifest last, published in place of the cache folder."""
    records = chunk_records(build, progress)
    num_kept = sum(record["rows"] for record in records)
    # Var(mean) + E[std^2], the sums added in chunk order: the same bits on 1 or N processes.
    total = total_sq = total_var = 0.0
    for record in records:
        total += record["sum"]
        total_sq += record["sum_sq"]
        total_var += record["sum_var"]
    count = num_kept * int(np.prod(build.latent_shape))
    variance = (total_sq - total**2 / count) / max(1, count - 1) + total_var / count
    extra: dict[str, Any] = {"variance": variance}
    if build.data.stream is not None:  # a cache encoded from memory names none
        extra["skipped"] = [name for record in records for name in record["skipped"]]
        extra["skipped_rows"] = [row for record in records for row in record["skipped_rows"]]
    if num_kept == build.num_rows:  # the build folder is the cache
        publish_build(build, manifest_of(build, build.partial, num_kept, extra))
        return
    # Rows were skipped: each chunk's kept rows (the first of its place), in chunk order.
    kept = [range(k * ENCODE_ROWS, k * ENCODE_ROWS + record["rows"])
            for k, record in enumerate(records)]  # fmt: skip
    compacted = build.partial / COMPACTED
    compacted.mkdir(exist_ok=True)
    for leftover in compacted.glob(".*"):  # a killed finish's half copy (we hold the lock)
        leftover.unlink()
    for name in array_names(build.random_flip):
        compact_array(build.partial / f"{name}.npy", kept, compacted / f"{name}.npy")
    write_json(compacted / MANIFEST, manifest_of(build, compacted, num_kept, extra))
    publish_dir(compacted, build.folder)
    discard(build.partial)


def compact_array(path: Path, rows: list[range], target: Path) -> None:
    """`target`: `rows` of the array at `path`, which is then removed (the disk holds one
    array twice at most). Renamed into place once complete: an interrupted finish continues
    with the arrays not yet compacted."""
    if not target.is_file():
        tmp = temp_path(target)
        try:
            copy_rows(np.load(path, mmap_mode="r", allow_pickle=False), rows, tmp)
            tmp.rename(target)
        finally:
            tmp.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def manifest_of(
    build: LatentBuild, folder: Path, num_rows: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of the arrays in `folder`, written last: their shape and each file's size
    (what a reader checks), the variance, what was skipped."""
    names = array_names(build.random_flip)
    return {
        "key": build.key, "version": LATENT_CACHE_VERSION,
        "shape": [num_rows, *build.latent_shape], "dtype": build.dtype,
        "sizes": {name: (folder / f"{name}.npy").stat().st_size for name in names}, **extra,
    }  # fmt: skip


def copy_rows(array: np.ndarray, rows: list[range], path: Path) -> None:
    """A new .npy file at `path` holding `rows` of `array`, in order, copied at most
    ENCODE_ROWS at a time: the whole array never sits in memory."""
    shape = (sum(len(r) for r in rows), *array.shape[1:])
    out = np.lib.format.open_memmap(path, "w+", array.dtype, shape)
    at = 0
    for part in rows:
        for start in range(part.start, part.stop, ENCODE_ROWS):
            stop = min(part.stop, start + ENCODE_ROWS)
            out[at : at + stop - start] = array[start:stop]
            at += stop - start
    out.flush()


class _DecodedRows(torch.utils.data.Dataset):
    """Item k: rows k*DECODE_ROWS.. of a streamed dataset decoded (`decode_all`), with the names
    of those skipped and the source row of each image kept; for DataLoader workers."""

    def __init__(self, stream: StreamSource) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return -(-len(self.stream.dataset) // DECODE_ROWS)

    def __getitem__(self, item: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        stream, start = self.stream, item * DECODE_ROWS
        rows = stream.dataset.select(range(start, min(len(stream.dataset), start + DECODE_ROWS)))
        images, names, _, index = decode_all(
            rows, stream.image_column, stream.resolution, stream.channels, stream.center_crop,
            first_row=start,
        )  # fmt: skip
        return images, names, index + start


def _as_is(item: Any) -> Any:
    return item


def decoded_chunks(
    stream: StreamSource, chunks: list[int], num_workers: int = 0
) -> Iterator[ChunkImages]:
    """Chunks `chunks` of a streamed dataset (source rows k*ENCODE_ROWS..), in that order,
    decoded by `num_workers` DataLoader workers DECODE_ROWS rows an item, with the function
    the in-memory path decodes with (`decode_all`: the same pixels). Unreadable rows are left
    out, as there, and named with their source rows (their labels go with them)."""
    assert ENCODE_ROWS % DECODE_ROWS == 0, (ENCODE_ROWS, DECODE_ROWS)  # a chunk is whole items
    per_chunk = ENCODE_ROWS // DECODE_ROWS
    rows = _DecodedRows(stream)
    items = {k: range(k * per_chunk, min(len(rows), (k + 1) * per_chunk)) for k in chunks}
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(rows, [item for k in chunks for item in items[k]]),
        batch_size=None,  # an item is DECODE_ROWS rows already
        num_workers=num_workers,
        collate_fn=_as_is,  # numpy arrays stay numpy arrays
        # Its workers' seed from a generator of its own: the global RNG, which builds the
        # network next, is the same whether the cache was encoded or found.
        generator=torch.Generator(),
    )
    decoded = iter(loader)
    for k in chunks:
        parts = [next(decoded) for _ in items[k]]
        source = range(k * ENCODE_ROWS, min(len(stream.dataset), (k + 1) * ENCODE_ROWS))
        kept = np.concatenate([part[2] for part in parts])
        yield ChunkImages(
            k,
            np.concatenate([part[0] for part in parts]),
            [name for part in parts for name in part[1]],
            np.setdiff1d(np.asarray(source), kept).tolist(),
        )


def load_latents(
    data: ImageData,
    encoder: Encoder,
    random_flip: bool,
    accelerator: Accelerator | None = None,
    cache_dir: Path | None = None,
    dtype: CacheDtype = "float16",
    num_workers: int = 0,
) -> LatentData:
    """The data's latents, memory-mapped: encoded once per node, or mapped from the cache.

    The node's processes share the encoding, each on its own device: chunk k of ENCODE_ROWS
    source rows is encoded by local process k % LOCAL_WORLD_SIZE, straight into the arrays of
    a build folder beside the cache (`latents-<key>.partial`) and recorded there; the local
    main process then publishes the cache (the kept rows in order, the manifest last, renamed
    into place). Nobody waits at a barrier: processes poll for the files. An interrupted build
    is continued by the next run with the same key (on any number of processes): recorded
    chunks are not encoded again. The cache is the same bytes however many processes built it.

    Decoded data is encoded from its images in memory; streamed data (`data.stream`) is
    decoded by each process's `num_workers` DataLoader workers, its own chunks only, so only
    a chunk's pixels are ever in memory. Both decode alike and skip unreadable rows alike, and
    the key is the same: a cache built either way serves the other. (Except when rows were
    skipped: the in-memory key counts the images kept, which a stream only knows once it has
    decoded them all, so its key counts the source's rows and the two caches differ. A chunk
    of the stream then holds fewer images than the in-memory path's: their latents are the
    same wherever the encoder's batch does not change an image's encoding, as on the CPU.)"""
    assert dtype in get_args(CacheDtype), dtype
    key = latent_cache_key(data, encoder, random_flip, dtype)
    folder = (default_cache_dir() if cache_dir is None else cache_dir) / f"latents-{key}"
    local_main = accelerator is None or accelerator.is_local_main_process
    if read_latent_cache(folder, key, warn=local_main) is None:
        image = to_pixels(data.images[:1])
        shape = tuple(encoder.encode(image)[0].shape[1:])
        build = LatentBuild(data, encoder, random_flip, dtype, key, folder, shape)
        # Every process refuses alike, before any work: the rows a build folder holds count
        # (read first: once it is gone, the cache was published and its bytes are no news).
        needed = build.num_bytes() - bytes_on_disk(build.partial)
        try:
            if read_latent_cache(folder, key, warn=False) is None:
                check_cache_space(needed, folder.parent)
            encode_share(build, accelerator, num_workers)
        except OSError as err:
            if err.errno not in CANNOT_WRITE:
                raise
            raise OutputError(
                f"could not write the latent cache {folder}: {err.strerror}. A latent run reads "
                f"its batches from it (it is not optional): {cache_fix()} (it needs "
                f"{format_bytes(build.num_bytes())}; a node-local disk), then run the same "
                "command again"
            ) from None
    latents = read_latent_cache(folder, key)
    if latents is None:
        raise RuntimeError(f"latent cache {folder} could not be read after it was written")
    latents.labels, latents.condition_name = data.labels, data.condition_name
    if data.stream is not None:
        latents.labels = stream_labels(data.stream, folder, len(latents.mean))
    return latents


def stream_labels(stream: StreamSource, folder: Path, num_rows: int) -> torch.Tensor | None:
    """The labels of the rows a streamed encoding kept (the manifest names those it skipped,
    logged here), row for row with the latents."""
    manifest = json.loads((folder / MANIFEST).read_text())
    skipped_rows = manifest.get("skipped_rows", [])  # none in a cache encoded from memory
    if manifest.get("skipped"):
        logger.warning("latents: %d unreadable image(s) left out: %s",
                       len(manifest["skipped"]), first_errors(manifest["skipped"]))  # fmt: skip
    if stream.labels is None:
        return None
    keep = torch.ones(len(stream.labels), dtype=torch.bool)
    keep[torch.tensor(skipped_rows, dtype=torch.int64)] = False
    labels = stream.labels[keep]
    assert len(labels) == num_rows, (len(labels), num_rows)
    return labels
