"""Tensor -> PNG helpers shared by the samplers and the training-time previews.

Kept numpy/PIL only (no torchvision) so the same grid code serves sampling scripts and tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """Map an NCHW float batch whose pixels live in `value_range` to NHWC uint8 in [0, 255].

    The basic model works in [0, 1] and DDPM in [-1, 1]; naming the range at the call site
    keeps the two from being mixed up. Values outside the range are clipped, then rounded.
    """
    if x.ndim != 4:
        raise ValueError(f"expected an NCHW batch with 4 dims; got shape {tuple(x.shape)}")
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low; got {value_range}")
    scaled = (x.detach().float().cpu() - low) / (high - low)
    scaled = (scaled * 255.0).round().clamp(0, 255).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile an NHWC uint8 batch into one HWC RGB image, `nrow` images per row.

    Like torchvision's make_grid: black padding around and between tiles; the default `nrow`
    makes the grid roughly square. Grayscale is repeated to 3 channels so every PNG is RGB.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"expected an NHWC uint8 array; got shape {images.shape}, dtype {images.dtype}"
        )
    num_images, height, width, channels = images.shape
    if num_images == 0:
        raise ValueError("cannot make a grid of 0 images")
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels; got {channels}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0; got {padding}")
    if nrow is None:
        nrow = math.ceil(math.sqrt(num_images))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1; got {nrow}")
    if channels == 1:
        images = np.repeat(images, 3, axis=3)
    num_cols = min(nrow, num_images)
    num_rows = math.ceil(num_images / num_cols)
    grid = np.zeros(
        (num_rows * (height + padding) + padding, num_cols * (width + padding) + padding, 3),
        dtype=np.uint8,
    )
    for k, image in enumerate(images):
        top = padding + (k // num_cols) * (height + padding)
        left = padding + (k % num_cols) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an HWC (or HW) uint8 array as a PNG, creating parent folders; returns the path."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"expected an HWC or HW uint8 array; got shape {array.shape}, dtype {array.dtype}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Repeat pixels (nearest, no smoothing) by the smallest whole factor that makes the longer
    side at least `min_side`: a 16x16 digits grid is viewable, and each pixel stays a square."""
    factor = max(1, -(-min_side // max(image.shape[0], image.shape[1])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def rows_by_label(
    images: np.ndarray, labels: Sequence[int], num_labels: int
) -> tuple[np.ndarray, int]:
    """(NHWC images ordered one label per row, images per row), for `make_grid(..., nrow=)`:
    label 0's images in the first row, label 1's in the second, ...; rows as long as the
    largest group, shorter ones padded with black."""
    groups = [
        [i for i, c in enumerate(labels) if c == k] for k in labels_by_row(labels, num_labels)
    ]
    width = max(len(group) for group in groups)
    blank = np.zeros_like(images[0])
    ordered = [images[g[j]] if j < len(g) else blank for g in groups for j in range(width)]
    return np.stack(ordered), width


def labels_by_row(labels: Sequence[int], num_labels: int) -> list[int]:
    """The label of each row `rows_by_label` makes, top to bottom: the labels 0..num_labels-1
    that have an image (a label without one gets no row)."""
    present = set(labels)
    return [k for k in range(num_labels) if k in present]
