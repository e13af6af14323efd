"""Image files -> uint8 pixels at the training size, and the on-disk cache of a decoded dataset.

Each file is opened once; files that are empty, truncated or not images raise here and are
skipped (and named) by the callers, never a crash mid-epoch. So are images declaring more than
PIL's `MAX_IMAGE_PIXELS` (~89 million) pixels: a decompression bomb is refused from its header,
before any pixel is decoded. Kept images are converted to 1 or 3 channels (16-bit images
rescaled to 8 bits, palette and transparent images composited over white), resized so the
shorter side is the resolution (smaller images are upscaled), and center-cropped.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageOps

from ddp_utils.errors import InputError
from ddp_utils.files import atomic_file

logger = logging.getLogger("ddp_diffusion")

CACHE_VERSION = 3  # 3: the row index of every kept image
MAX_REPLACEMENTS = 64  # consecutive unreadable rows before giving up on a streamed row


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than PIL's decompression-bomb limit."""


def open_image(value: Any) -> Image.Image:
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


def row_name(value: Any, index: int) -> str:
    """How a log line names a row: its file path when it has one."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return f"row {index}"


def raw_images(ds: Any, image_column: str) -> Any:
    """The dataset's image column as undecoded bytes/paths (decoding happens here, not in HF)."""
    return ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))


SHAPE_SAMPLE_ROWS = 1000  # rows whose headers decide the default size and channels
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def common_shape(ds: Any, image_column: str) -> tuple[int, int, str] | None:
    """(size, channels, a line for the log) most common among the images: the shorter side,
    and 1 for grayscale modes (a palette of grays included), else 3.

    Reads the headers (no pixels) of up to SHAPE_SAMPLE_ROWS rows spread evenly over the
    dataset, the same rows on every rank. None when none of them can be read.
    """
    num_rows = len(ds)
    rows = sorted({k * num_rows // SHAPE_SAMPLE_ROWS for k in range(SHAPE_SAMPLE_ROWS)})
    sizes: dict[int, int] = {}
    channels: dict[int, int] = {}
    for value in raw_images(ds.select(rows), image_column)[image_column]:
        try:
            data, path = value.get("bytes"), value.get("path")
            with Image.open(io.BytesIO(data)) if data else Image.open(path) as image:
                side, gray = min(image.size), _is_gray(image)
        except Exception:  # noqa: BLE001 - unreadable files are skipped (and named) by decoding
            continue
        sizes[side] = sizes.get(side, 0) + 1
        channels[1 if gray else 3] = channels.get(1 if gray else 3, 0) + 1
    if not sizes:
        return None
    size, num_size = max(sizes.items(), key=lambda item: (item[1], item[0]))
    num_channels, num_mode = max(channels.items(), key=lambda item: (item[1], item[0]))
    total = sum(sizes.values())
    line = (
        f"{size}x{size} ({num_size} of {total} images sampled have that shorter side), "
        f"{num_channels} channel(s) ({num_mode} of {total} are "
        f"{'grayscale' if num_channels == 1 else 'in colour'})"
    )
    return size, num_channels, line


def _is_gray(image: Image.Image) -> bool:
    if image.mode == "P":
        palette = image.getpalette() or []
        return all(
            palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3)
        )
    return image.mode in GRAYSCALE_MODES


def decode_all(
    ds: Any,
    image_column: str,
    resolution: int,
    channels: int,
    center_crop: bool,
    first_row: int = 0,
) -> tuple[np.ndarray, list[str], int, np.ndarray]:
    """Decode every row; return (uint8 N,C,H,W array, names of skipped rows, # upscaled, the
    row index of each kept image). `first_row`: where `ds` starts in the whole dataset, for
    the names of skipped rows without a file path."""
    ds = raw_images(ds, image_column)
    out = np.empty((len(ds), channels, resolution, resolution), dtype=np.uint8)
    rows = np.empty(len(ds), dtype=np.int64)
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
                name = row_name(value, first_row + index)
                skipped.append(f"{name} ({type(err).__name__}: {err})")
                continue
            num_upscaled += min(image.size) < resolution
            rows[kept] = index
            kept += 1
    return out[:kept], skipped, num_upscaled, rows[:kept]


def decode_row(
    ds: Any, image_column: str, index: int, resolution: int, channels: int, center_crop: bool
) -> tuple[np.ndarray, list[str], int]:
    """The image of row `index`, or of the next readable row; names of the rows skipped; the
    row it came from (its label goes with it).

    For the streaming path, which cannot drop a row without shifting the batch order: a bad
    row is replaced by the next readable one, deterministically, so resume stays exact.
    """
    skipped: list[str] = []
    num_rows = len(ds)
    for attempt in range(MAX_REPLACEMENTS):
        row = (index + attempt) % num_rows
        value = ds[row][image_column]
        try:
            image = open_image(value)
            return preprocess(image, resolution, channels, center_crop), skipped, row
        except Exception as err:  # noqa: BLE001 - malformed files raise all sorts of types
            skipped.append(f"{row_name(value, row)} ({type(err).__name__}: {err})")
    raise InputError(
        f"{MAX_REPLACEMENTS} consecutive rows from row {index} could not be decoded: "
        f"{skipped[0]} ...; check the dataset",
        "dataset",
    )


# --------------------------------------------------------------------------- the cache


CACHE_VARIABLE = "DDP_DIFFUSION_CACHE"


def default_cache_dir() -> Path:
    """$DDP_DIFFUSION_CACHE, else $XDG_CACHE_HOME/ddp-diffusion, else ~/.cache/ddp-diffusion."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddp-diffusion"


def cache_fix() -> str:
    """How to move the toolkit's cache, for a message about one that cannot be written."""
    value = os.environ.get(CACHE_VARIABLE)
    now = f"now {value}" if value else f"unset: {default_cache_dir()}"
    return f"set {CACHE_VARIABLE} ({now}) to a writable folder with free space"


def read_cache(
    path: Path, fingerprint: str
) -> tuple[np.ndarray, list[str], int, np.ndarray] | None:
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
                data["rows"],
            )
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        logger.warning("image cache %s is damaged (%s); rebuilding it", path, err)
        return None


def write_cache(
    path: Path,
    fingerprint: str,
    images: np.ndarray,
    skipped: list[str],
    num_upscaled: int,
    rows: np.ndarray,
) -> None:
    with atomic_file(path) as f:
        np.savez(
            f,
            images=images,
            skipped=np.array(skipped, dtype=str),
            fingerprint=fingerprint,
            num_upscaled=num_upscaled,
            rows=rows,
        )
