"""Images in, uint8 batches out: every data source behind one `--dataset` flag.

Sources (`--dataset`):
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download);
- a local folder of images (HF `imagefolder`; nested folders allowed);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- a hub dataset id (`--dataset-config`, `--split`), with the aliases `mnist`,
  `fashion_mnist` and `cifar10`.

Every source becomes an HF `datasets.Dataset` with an image column; each file is opened once,
and files that are empty, truncated or not images are skipped, counted and named in the log
(never a crash mid-epoch). So are images declaring more than PIL's `MAX_IMAGE_PIXELS`
(~89 million) pixels: a decompression bomb is refused from its header, before any pixel is
decoded. Kept images are converted to the `--channels` (16-bit images rescaled to 8 bits,
palette and transparent images composited over white), resized so the shorter side is
`--resolution` (images smaller than that are upscaled, and the log says how many), center-
cropped, and stored as one uint8 tensor (N, C, H, W), cached on disk under the dataset's
fingerprint so the decode happens once per node.

Batches come from `batch_indices`, a pure function of (seed, micro-step, rank): the data
order never depends on a restart or on a sampler's hidden state, so resume is exact and
costs nothing (no `skip_first_batches` replay). The global batch at a step is the same set of
images for any number of processes with the same global batch size.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ddp_utils.checkpoint import unique_suffix

logger = logging.getLogger(__name__)

HUB_ALIASES = {
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "cifar10": "uoft-cs/cifar10",
}
NATIVE_RESOLUTION = {"digits": 16, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}
GRAYSCALE_SOURCES = {"digits", "mnist", "fashion_mnist"}
CACHE_VERSION = 2


def default_resolution(dataset: str) -> int:
    return NATIVE_RESOLUTION.get(dataset, 32)


def default_channels(dataset: str) -> int:
    return 1 if dataset in GRAYSCALE_SOURCES else 3


def default_cache_dir() -> Path:
    return Path(os.environ.get("DDP_DIFFUSION_CACHE", Path.home() / ".cache" / "ddp-diffusion"))


@dataclass
class ImageData:
    """A decoded dataset: uint8 images (N, C, H, W) plus where they came from."""

    images: torch.Tensor
    fingerprint: str
    source: str
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    num_upscaled: int = 0  # images smaller than --resolution, upscaled to it
    # --data-loading stream: the rows to decode per batch (ddp_utils.streaming); `images` then
    # holds only the first rows, decoded, for previews and evaluation references.
    stream: StreamSource | None = None

    @property
    def num_images(self) -> int:
        if self.stream is not None:
            return len(self.stream.dataset)
        return int(self.images.shape[0])


@dataclass
class StreamSource:
    """An HF dataset and how to decode its rows, for the streaming path."""

    dataset: Any
    image_column: str
    resolution: int
    channels: int
    center_crop: bool


STREAM_PREVIEW_ROWS = 1024  # rows decoded up front in stream mode (previews, FID reference)


# --------------------------------------------------------------------------- loading sources


def _load_digits():
    from datasets import Dataset
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16: scale to 0..255 as 8-bit grayscale.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    dataset = Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target}
    )
    return dataset, "sklearn-digits-v1"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name)


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _load_source(dataset: str, dataset_config: str | None, split: str):
    """Return (hf Dataset, fingerprint, human-readable source) for `--dataset`."""
    import datasets

    if dataset == "digits":
        ds, fingerprint = _load_digits()
        return ds, fingerprint, "scikit-learn digits (built in)"

    path = Path(dataset).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as err:  # noqa: BLE001 - datasets fails on empty folders with IndexError
                raise ValueError(
                    f"--dataset {dataset}: the save_to_disk folder could not be loaded "
                    f"({type(err).__name__}: {err}); is the dataset empty or damaged?"
                ) from None
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(
                        f"--split {split!r} is not in the saved dataset {path}; "
                        f"it has: {', '.join(ds)}"
                    )
                ds = ds[split]
            return ds, ds._fingerprint, f"save_to_disk folder {path}"
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        except datasets.data_files.EmptyDatasetError:
            raise ValueError(
                f"--dataset {dataset}: the folder holds no image files "
                "(looked for .png, .jpg, .jpeg, .webp, ... in it and its subfolders)"
            ) from None
        return ds, _folder_fingerprint(path), f"image folder {path}"
    if path.exists():
        raise ValueError(f"--dataset {dataset}: is a file; give a folder of images or a hub id")
    if _looks_like_path(dataset):
        raise ValueError(f"--dataset {dataset}: no such folder")

    hub_id = HUB_ALIASES.get(dataset, dataset)
    try:
        ds = datasets.load_dataset(hub_id, dataset_config, split=split)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix in the message
        offline = any(
            os.environ.get(name, "0").lower() not in ("0", "", "false", "no", "off")
            for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        hint = (
            "offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache: download it once "
            "with network access, or pass a local folder / save_to_disk path"
            if offline
            else "check the id, --dataset-config and --split, and your network"
        )
        local = "" if dataset in HUB_ALIASES else f" (and there is no local folder {path})"
        raise ValueError(
            f"--dataset {dataset}: could not load hub dataset {hub_id!r}{local} "
            f"({type(err).__name__}: {err}). {hint}"
        ) from None
    return ds, ds._fingerprint, f"hub dataset {hub_id} ({split})"


def _folder_fingerprint(path: Path) -> str:
    """Content identity of an image folder: relative paths, sizes and mtimes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def detect_image_column(ds, image_column: str | None) -> str:
    from datasets import Image as ImageFeature

    columns = list(ds.features)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(
                f"--image-column {image_column!r} is not a column; columns: {', '.join(columns)}"
            )
        return image_column
    image_columns = [c for c, f in ds.features.items() if isinstance(f, ImageFeature)]
    if len(image_columns) == 1:
        return image_columns[0]
    if not image_columns:
        raise ValueError(
            f"no image column found (columns: {', '.join(columns)}); pass --image-column"
        )
    raise ValueError(
        f"several image columns ({', '.join(image_columns)}); choose one with --image-column"
    )


# --------------------------------------------------------------------------- decoding


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than PIL's decompression-bomb limit."""


def open_image(value) -> Image.Image:
    """Open and fully decode one `Image(decode=False)` value (dict with bytes/path).

    The size check happens on the header, before decoding: PIL raises
    `DecompressionBombError` above 2x `Image.MAX_IMAGE_PIXELS` and only warns between 1x and
    2x; both are refused here, so no image above the limit is ever decoded.
    """
    if isinstance(value, Image.Image):
        _check_size(value.size)
        value.load()
        return value
    data, path = (value.get("bytes"), value.get("path")) if value else (None, None)
    if not data and not path:
        raise ValueError("the row has no image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data)) if data else Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageTooLargeError(f"decompression bomb refused: {err}") from None
    _check_size(image.size)
    image.load()  # truncated files fail here, not mid-epoch
    return image


def _check_size(size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise ImageTooLargeError(
            f"decompression bomb refused: {size[0]}x{size[1]} pixels exceeds {limit}"
        )


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to L or RGB; transparency is composited over white.

    16-bit grayscale (`I;16*`, and `I`, which older Pillow gives for 16-bit PNGs) is mapped
    0..65535 -> 0..255: PIL's own `convert("L")` clips everything above 255 to white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.round(array * (255.0 / 65535.0)).astype(np.uint8), mode="L")
    if "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def preprocess(image: Image.Image, resolution: int, channels: int, center_crop: bool) -> np.ndarray:
    """PIL image -> uint8 (C, H, W): shorter side to `resolution`, then crop or squash.

    Images smaller than `resolution` are upscaled (bicubic) like any other.
    """
    image = ImageOps.exif_transpose(image)  # camera photos: apply the EXIF rotation
    image = to_mode(image, channels)
    if center_crop:
        width, height = image.size
        scale = resolution / min(width, height)
        new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        left = (new_size[0] - resolution) // 2
        top = (new_size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    else:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _row_name(value, index: int) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return f"row {index}"


def decode_all(
    ds, image_column: str, resolution: int, channels: int, center_crop: bool
) -> tuple[np.ndarray, list[str], int]:
    """Decode every row; return (uint8 N,C,H,W array, names of skipped rows, # upscaled)."""
    from datasets import Image as ImageFeature

    ds = ds.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    out = np.empty((len(ds), channels, resolution, resolution), dtype=np.uint8)
    skipped: list[str] = []
    kept = num_upscaled = 0
    chunk = 1024  # rows read at a time: raw bytes of the whole dataset never sit in memory
    for start in range(0, len(ds), chunk):
        values = ds[start : start + chunk][image_column]
        for index, value in enumerate(values, start):
            try:
                image = open_image(value)
                out[kept] = preprocess(image, resolution, channels, center_crop)
            except Exception as err:  # noqa: BLE001 - malformed files raise all sorts of types
                # (OSError, SyntaxError, struct.error, IndexError from broken EXIF, ...): one
                # bad file is skipped and named, never a crash.
                skipped.append(f"{_row_name(value, index)} ({type(err).__name__}: {err})")
                continue
            num_upscaled += min(image.size) < resolution
            kept += 1
    return out[:kept], skipped, num_upscaled


def load_image_data(
    dataset: str,
    resolution: int,
    channels: int,
    dataset_config: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    center_crop: bool = True,
    max_images: int | None = None,
    cache_dir: Path | None = None,
    accelerator=None,
    data_loading: str = "memory",
) -> ImageData:
    """Load, validate and decode a dataset once per node (cached under its fingerprint).

    Collective-safe: the local main process of each node decodes and writes the cache while
    the other processes wait, then everyone reads it.
    """
    if channels not in (1, 3):
        raise ValueError(f"--channels must be 1 or 3, got {channels}")
    if resolution < 4:
        raise ValueError(f"--resolution must be at least 4, got {resolution}")
    ds, base_fingerprint, source = _load_source(dataset, dataset_config, split)
    if len(ds) == 0:
        raise ValueError(f"--dataset {dataset}: the dataset is empty ({source})")
    column = detect_image_column(ds, image_column)
    if max_images is not None:
        ds = ds.select(range(min(max_images, len(ds))))
    key = {
        "version": CACHE_VERSION,
        "fingerprint": base_fingerprint,
        "column": column,
        "resolution": resolution,
        "channels": channels,
        "center_crop": center_crop,
        "num_rows": len(ds),
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    from ddp_utils.streaming import choose_data_loading

    if choose_data_loading(data_loading, len(ds), resolution, channels) == "stream":
        preview = ds.select(range(min(len(ds), STREAM_PREVIEW_ROWS)))
        images, skipped, num_upscaled = decode_all(
            preview, column, resolution, channels, center_crop
        )
        if len(images) == 0:
            raise ValueError(
                f"--dataset {dataset}: none of the first {len(preview)} images could be read "
                f"({source})"
            )
        return ImageData(
            images=torch.from_numpy(images),
            fingerprint=fingerprint,
            source=f"{source}, streamed",
            num_skipped=len(skipped),
            skipped=skipped,
            num_upscaled=num_upscaled,
            stream=StreamSource(ds, column, resolution, channels, center_crop),
        )
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cache_file = cache_dir / f"images-{fingerprint}.npz"

    def build() -> None:
        if _read_cache(cache_file, fingerprint) is not None:
            return
        images, skipped, num_upscaled = decode_all(ds, column, resolution, channels, center_crop)
        _write_cache(cache_file, fingerprint, images, skipped, num_upscaled)

    if accelerator is None:
        build()
    else:
        with accelerator.local_main_process_first():
            if accelerator.is_local_main_process:
                build()
    cached = _read_cache(cache_file, fingerprint)
    if cached is None:
        raise RuntimeError(f"image cache {cache_file} could not be read after it was written")
    images, skipped, num_upscaled = cached
    if skipped:
        shown = "\n  ".join(skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        logger.warning("skipped %d unreadable image(s):\n  %s%s", len(skipped), shown, more)
    if num_upscaled:
        logger.info(
            "%d image(s) smaller than --resolution %d were upscaled to it",
            num_upscaled,
            resolution,
        )
    if len(images) == 0:
        raise ValueError(
            f"--dataset {dataset}: none of the {len(ds)} images could be read ({source})"
        )
    return ImageData(
        images=torch.from_numpy(images),
        fingerprint=fingerprint,
        source=source,
        num_skipped=len(skipped),
        skipped=skipped,
        num_upscaled=num_upscaled,
    )


def _read_cache(path: Path, fingerprint: str) -> tuple[np.ndarray, list[str], int] | None:
    """The cached decode, or None when missing, stale or damaged (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            return (
                data["images"],
                [str(s) for s in data["skipped"]],
                int(data["num_upscaled"]),
            )
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        logger.warning("image cache %s is damaged (%s); rebuilding it", path, err)
        return None


def _write_cache(
    path: Path, fingerprint: str, images: np.ndarray, skipped: list[str], num_upscaled: int
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{unique_suffix()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                images=images,
                skipped=np.array(skipped, dtype=str),
                fingerprint=fingerprint,
                num_upscaled=num_upscaled,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- batching


@lru_cache(maxsize=4)
@lru_cache(maxsize=4)  # a batch straddles at most two epochs; randperm(1.3M) costs ~10 ms
def _epoch_permutation(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    from ddp_utils.distributed import derive_seed

    generator = torch.Generator().manual_seed(derive_seed("epoch", seed, epoch))
    return torch.randperm(num_images, generator=generator)


def batch_indices(
    micro_step: int,
    num_images: int,
    per_device_batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
) -> torch.Tensor:
    """Indices of the images that `rank` trains on at `micro_step`.

    The data stream is the concatenation of per-epoch permutations (each seeded from
    (seed, epoch)); micro-step u takes the global slice [u*G, (u+1)*G) with G the global
    micro-batch, and rank r the r-th per-device part of it. A batch may straddle two epochs.
    """
    global_batch = per_device_batch_size * world_size
    start = micro_step * global_batch + rank * per_device_batch_size
    positions = torch.arange(start, start + per_device_batch_size)
    epochs = positions // num_images
    offsets = positions % num_images
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        out[mask] = _epoch_permutation(seed, epoch, num_images)[offsets[mask]]
    return out


class Batches:
    """Endless uint8 batches for one rank, starting at any micro-step.

    The whole decoded dataset is moved to the training device once (CIFAR-10 at 32x32 is
    150 MB), so a step costs one gather on the device: no PIL, no workers, no host copy.
    """

    def __init__(self, data: ImageData, per_device_batch_size: int, accelerator, seed: int):
        if data.num_images < per_device_batch_size * accelerator.num_processes:
            logger.warning(
                "the dataset (%d images) is smaller than one global batch (%d): "
                "images repeat within a batch",
                data.num_images,
                per_device_batch_size * accelerator.num_processes,
            )
        self.images = data.images.to(accelerator.device)
        self.per_device_batch_size = per_device_batch_size
        self.world_size = accelerator.num_processes
        self.rank = accelerator.process_index
        self.seed = seed

    def get(self, micro_step: int) -> torch.Tensor:
        index = batch_indices(
            micro_step,
            self.images.shape[0],
            self.per_device_batch_size,
            self.world_size,
            self.rank,
            self.seed,
        )
        return self.images[index.to(self.images.device, non_blocking=True)]


def to_float(
    batch: torch.Tensor, value_range: tuple[float, float], flip_generator: torch.Generator | None
) -> torch.Tensor:
    """uint8 (B,C,H,W) -> float in `value_range`, random horizontal flip on the device."""
    low, high = value_range
    if flip_generator is not None:
        # Flip the uint8 batch (4x less memory traffic than flipping floats).
        flip = torch.rand(batch.shape[0], generator=flip_generator, device=batch.device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    # One float copy, scaled in place: no temporaries (this runs every micro-step).
    return batch.to(torch.float32, copy=True).mul_((high - low) / 255.0).add_(low)
