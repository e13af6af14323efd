"""A decoded dataset encoded once per node into latents, cached like the decoded images, and
the training batches drawn from them.

Generic over an `Encoder` (what has a fingerprint and turns float images into a posterior's
mean and standard deviation; `diffusion.codecs.LatentCodec` is one). The cache is keyed by the
data's fingerprint (source, resolution, channels, crop), the encoder's (its weights), the flip
policy and the stored dtype; it is written once per node by the local main process, atomically,
checked by every process, and rebuilt (with a warning) when it is damaged or stale.

The cache is a folder of raw `.npy` arrays (`mean.npy`, `std.npy`, with flips
`flipped_mean.npy`, `flipped_std.npy`) and a `manifest.json` (key, shape, dtype, file sizes).
It is encoded in chunks straight into the arrays on disk, and every process maps the files
read-only (`np.load(mmap_mode="r")`): the page cache holds one copy per node, shared by its
processes, and only the rows a batch touches are read. ImageNet-256 through an 8x VAE is 42 GB
in float16 with flips: it never has to fit in a process's memory, nor on a device.

With random flips, both the images and their mirror images are encoded, so a flip in latent
space is the encoding of the flipped image, exactly. A batch draws z = mean + std * eps with
the micro-step's seeded generator (the flip first, then eps, as the pixel path draws its
flip): resume stays exact and a sample of the posterior is fresh at every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.data.batches import Batch, BatchSource
from ddp_utils.data.decode import decode_all, default_cache_dir
from ddp_utils.data.load import ImageData, StreamSource, first_errors
from ddp_utils.errors import InputError
from ddp_utils.files import atomic_dir, write_json

logger = logging.getLogger("ddp_diffusion")

LATENT_CACHE_VERSION = 2  # 1: one .npz of float32 arrays, loaded whole (now ignored)
PIXEL_RANGE = (-1.0, 1.0)  # what encoders are given
ENCODE_ROWS = 4096  # images converted to float and handed to the encoder at a time
DECODE_ROWS = 256  # rows a DataLoader worker decodes at a time, for a streamed dataset
CacheDtype = Literal["float16", "float32"]
MANIFEST = "manifest.json"
WAIT_SECONDS = 5.0  # how often the processes that do not encode look for the finished cache


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
    labels: torch.Tensor | None = None  # int64 (N,): each row's class (class-conditional)
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
    rebuilt). Checks the manifest against each file's header (shape, dtype) and size, never
    the values: reading 42 GB at every start would cost minutes."""
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


def disk_free(folder: Path) -> int:
    """Bytes free for a new file in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def check_cache_space(num_bytes: int, folder: Path) -> None:
    """Refuse a cache the disk cannot hold, before encoding any of it."""
    free = disk_free(folder)
    if num_bytes > free:
        gb = 1e9
        raise InputError(
            f"the latent cache needs {num_bytes / gb:,.1f} GB in {folder} and only "
            f"{free / gb:,.1f} GB are free: set DDP_DIFFUSION_CACHE to a folder on a larger "
            "disk (a node-local SSD: every node writes its own copy), or train on fewer images"
        )


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    low, high = PIXEL_RANGE
    return images.to(torch.float32) * ((high - low) / 255.0) + low


def encode_into(
    tmp: Path, key: str, chunks: Iterable[np.ndarray | torch.Tensor], num_rows: int,
    encoder: Encoder, random_flip: bool, dtype: CacheDtype, latent_shape: tuple[int, ...],
    extra: Callable[[], dict[str, Any]] | None = None,
) -> None:  # fmt: skip
    """Encode chunks of uint8 images (n, C, H, W), in dataset order (and their mirror images
    with flips), straight into .npy arrays in `tmp` of `num_rows` rows: neither the float
    pixels nor the latents of the whole dataset ever sit in memory. When the chunks hold fewer
    rows (unreadable images skipped while decoding), the arrays are cut to the rows written.
    The manifest (with what `extra()` returns then) is written last."""
    shape = (num_rows, *latent_shape)
    arrays = {
        name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", np.dtype(dtype), shape)
        for name in array_names(random_flip)
    }
    # Var(mean) + E[std^2] over the data, summed in float64 from the float32 encodings.
    total, total_sq, total_var = 0.0, 0.0, 0.0
    began = reported = time.monotonic()
    start = 0
    for chunk in chunks:
        if time.monotonic() - reported > 60:  # ImageNet takes a while: say how far it is
            reported = time.monotonic()
            logger.info("latents: %d of %d images encoded (%.0f images/s)", start,
                        num_rows, start / (reported - began))  # fmt: skip
        pixels = to_pixels(torch.as_tensor(chunk))
        views = {"": pixels, "flipped_": pixels.flip(3)} if random_flip else {"": pixels}
        for prefix, view in views.items():
            mean, std = encoder.encode(view)
            arrays[f"{prefix}mean"][start : start + len(mean)] = mean.numpy()
            arrays[f"{prefix}std"][start : start + len(std)] = std.numpy()
            if not prefix:
                total += mean.double().sum().item()
                total_sq += mean.double().square().sum().item()
                total_var += std.double().square().sum().item()
        start += len(pixels)
    if start < num_rows:  # rows were skipped: keep the first `start` rows
        shape = (start, *latent_shape)
        for name, array in list(arrays.items()):
            arrays[name] = cut_rows(tmp / f"{name}.npy", array, start)
    count = shape[0] * int(np.prod(latent_shape))
    variance = (total_sq - total**2 / count) / max(1, count - 1) + total_var / count
    sizes = {}
    for name, array in arrays.items():
        array.flush()
        sizes[name] = (tmp / f"{name}.npy").stat().st_size
    arrays.clear()  # unmapped: the files are complete
    write_json(tmp / MANIFEST, {
        "key": key, "version": LATENT_CACHE_VERSION, "shape": list(shape), "dtype": dtype,
        "sizes": sizes, "variance": variance, **(extra() if extra else {}),
    })  # fmt: skip


def cut_rows(path: Path, array: np.memmap, num_rows: int) -> np.memmap:
    """The .npy file at `path` holding only the first `num_rows` rows of `array` (its map),
    copied ENCODE_ROWS at a time into a new file that replaces it."""
    short = path.with_name(f"short-{path.name}")
    out = np.lib.format.open_memmap(short, "w+", array.dtype, (num_rows, *array.shape[1:]))
    for start in range(0, num_rows, ENCODE_ROWS):
        out[start : start + ENCODE_ROWS] = array[start : min(num_rows, start + ENCODE_ROWS)]
    out.flush()
    del array
    short.replace(path)
    return out


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
    stream: StreamSource, skipped: list[str], kept: list[np.ndarray], num_workers: int = 0
) -> Iterator[np.ndarray]:
    """The streamed dataset decoded in order by `num_workers` DataLoader workers, with the
    function the in-memory path decodes with (`decode_all`: the same pixels), and handed on
    ENCODE_ROWS images at a time: the chunks the in-memory path encodes, so the same latents.
    Unreadable rows are left out, as there, their names appended to `skipped`, and the source
    row of every image kept appended to `kept` (their labels go with them)."""
    loader = torch.utils.data.DataLoader(
        _DecodedRows(stream),
        batch_size=None,  # an item is DECODE_ROWS rows already
        num_workers=num_workers,
        collate_fn=_as_is,  # numpy arrays stay numpy arrays
        # Its workers' seed from a generator of its own: the global RNG, which builds the
        # network next, is the same whether the cache was encoded or found.
        generator=torch.Generator(),
    )
    pending: list[np.ndarray] = []
    num_pending = 0
    for images, names, rows in loader:
        skipped.extend(names)
        kept.append(rows)
        pending.append(images)
        num_pending += len(images)
        while num_pending >= ENCODE_ROWS:
            joined = np.concatenate(pending)
            yield joined[:ENCODE_ROWS]
            pending, num_pending = [joined[ENCODE_ROWS:]], num_pending - ENCODE_ROWS
    if num_pending:
        yield np.concatenate(pending)


def load_latents(
    data: ImageData,
    encoder: Encoder,
    random_flip: bool,
    accelerator: Accelerator | None = None,
    cache_dir: Path | None = None,
    dtype: CacheDtype = "float16",
    num_workers: int = 0,
) -> LatentData:
    """The data's latents, memory-mapped: encoded once per node (the local main process writes
    the cache, the others wait for its files, not at a barrier, and map it), or mapped from the
    cache.

    Decoded data is encoded from its images in memory; streamed data (`data.stream`) in one
    pass over the source in dataset order, decoded by `num_workers` DataLoader workers (the
    node's other processes are idle meanwhile), so only a chunk's pixels are ever in memory.
    Both decode alike, skip unreadable rows alike and encode the same chunks, and the key is
    the same: a cache built either way serves the other. (Except when rows were skipped: the
    in-memory key counts the images kept, which a stream only knows once it has decoded them
    all, so its key counts the source's rows and the two caches differ.)"""
    assert dtype in get_args(CacheDtype), dtype
    key = latent_cache_key(data, encoder, random_flip, dtype)
    folder = (default_cache_dir() if cache_dir is None else cache_dir) / f"latents-{key}"
    local_main = accelerator is None or accelerator.is_local_main_process

    def latent_shape() -> tuple[int, ...]:
        return tuple(encoder.encode(to_pixels(data.images[:1]))[0].shape[1:])  # one image

    if read_latent_cache(folder, key, warn=local_main) is None:
        # Every process refuses alike, before any of them waits on the writer.
        per_array = data.num_images * int(np.prod(latent_shape())) * np.dtype(dtype).itemsize
        check_cache_space(per_array * len(array_names(random_flip)), folder.parent)

    def build() -> None:
        if read_latent_cache(folder, key, warn=False) is not None:
            logger.info("latents: reading %s", folder)
            return
        logger.info("latents: encoding %d images once into %s", data.num_images, folder)
        with atomic_dir(folder) as tmp:
            if data.stream is None:
                chunks = (data.images[k : k + ENCODE_ROWS]
                          for k in range(0, data.num_images, ENCODE_ROWS))  # fmt: skip
                encode_into(tmp, key, chunks, data.num_images, encoder, random_flip, dtype,
                            latent_shape())  # fmt: skip
                return
            skipped: list[str] = []
            kept: list[np.ndarray] = []

            def skipped_rows() -> dict[str, Any]:  # once the pass is over
                rows = np.concatenate(kept) if kept else np.empty(0, np.int64)
                missing = np.setdiff1d(np.arange(data.num_images), rows)
                return {"skipped": skipped, "skipped_rows": missing.tolist()}

            chunks = decoded_chunks(data.stream, skipped, kept, num_workers)
            encode_into(tmp, key, chunks, data.num_images, encoder, random_flip, dtype,
                        latent_shape(), skipped_rows)  # fmt: skip

    if local_main:
        build()
    else:
        wait_for_cache(folder, key)
    latents = read_latent_cache(folder, key)
    if latents is None:
        raise RuntimeError(f"latent cache {folder} could not be read after it was written")
    latents.labels = data.labels
    if data.stream is not None:
        latents.labels = stream_labels(data.stream, folder, len(latents.mean))
    return latents


def wait_for_cache(folder: Path, key: str) -> None:
    """Wait, without any collective, until this node's local main process has written the
    cache: encoding ImageNet takes hours, and a barrier (NCCL's) gives up after its timeout
    (10 minutes by default). Should the writer die, the launcher stops this process."""
    began = reported = time.monotonic()
    while read_latent_cache(folder, key, warn=False) is None:
        if time.monotonic() - reported > 600:
            reported = time.monotonic()
            logger.info("latents: waited %.0f min for the local main process to encode %s",
                        (reported - began) / 60, folder)  # fmt: skip
        time.sleep(WAIT_SECONDS)


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


class LatentBatches(BatchSource):
    """Batches of latents: each batch's rows gathered on the host from the mapped cache (only
    those pages are read), converted to float32 and copied to the device (through pinned
    memory on a GPU, without waiting for it), then z = (mean + std * eps - shift) * scale with
    the micro-step's generator; the labels are the latents' own (`LatentData.labels`, row for
    row). The pixels stay on the host (`ImageData.images`, of a streamed dataset its first rows
    only: grids of real data, the FID reference)."""

    def __init__(self, latents: LatentData, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.latents = latents
        self.num_images = len(latents.mean)
        self.labels = latents.labels
        if self.random_flip:
            assert latents.flipped_mean is not None, "flips need the mirror images' latents"
        self.warn_if_smaller_than_a_batch(self.num_images)

    def to_device(self, rows: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def gather(self, array: np.ndarray, index: np.ndarray) -> torch.Tensor:
        """Rows `index` of a mapped array, float32, on the device."""
        return self.to_device(torch.from_numpy(np.asarray(array[index], dtype=np.float32)))

    def get(self, micro_step: int, generator: torch.Generator) -> Batch:
        rows = self.indices(micro_step, self.num_images)  # the pixel path's order, on the CPU
        index = rows.numpy()
        latents = self.latents
        mean, std = self.gather(latents.mean, index), self.gather(latents.std, index)
        if self.random_flip:  # drawn first, as the pixel path's flip
            flip = torch.rand(len(index), generator=generator, device=self.device) < 0.5
            flip = flip[:, None, None, None]
            mean = torch.where(flip, self.gather(latents.flipped_mean, index), mean)
            std = torch.where(flip, self.gather(latents.flipped_std, index), std)
        eps = torch.randn(mean.shape, generator=generator, device=self.device)
        z = (mean + std * eps - latents.shift) * latents.scale
        labels = None if self.labels is None else self.to_device(self.labels[rows])
        return Batch(z, labels)
