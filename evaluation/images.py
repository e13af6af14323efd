"""Image sets on disk -> uint8 (N, C, H, W) tensors: an .npz of samples or a folder of images.

Every path here is one a user gave, so whatever is wrong with it is an `InputError` (exit 2,
one line); the script names the flag it came from.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ddp_utils.data.decode import open_image, to_mode
from ddp_utils.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NPZ_KEYS = ("arr_0", "images")
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def load_images(path: str | os.PathLike) -> torch.Tensor:
    """An .npz file or a folder of PNG/JPEG images -> uint8 (N, C, H, W), C in {1, 3}."""
    path = Path(path)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix.lower() == ".npz":
        return load_npz_images(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    raise InputError(
        f"{path}: expected an .npz file or a folder of {'/'.join(IMAGE_EXTENSIONS)} images"
    )


def load_npz_images(path: str | os.PathLike) -> torch.Tensor:
    """`arr_0` or `images` of an .npz: uint8 (N, H, W, C) with C in {1, 3}, or (N, H, W)."""
    expected = (
        f"expected an .npz archive (numpy.savez) of uint8 images (N, H, W, C) in "
        f"{' or '.join(NPZ_KEYS)}, as sample.py writes"
    )
    if not Path(path).is_file():
        raise InputError(f"{path} does not exist")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle, and suggest one
        raise InputError(f"{path} is not an .npz archive: {expected}")
    try:
        with np.load(path, allow_pickle=False) as data:
            name = next((k for k in NPZ_KEYS if k in data.files), None)
            if name is None:
                raise InputError(
                    f"{path}: no array named {' or '.join(NPZ_KEYS)} (found {data.files})"
                )
            array = data[name]
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path} cannot be read ({err}): {expected}") from None
    except InputError:
        raise
    except ValueError as err:  # numpy's: a pickled array, or a damaged array header
        if "pickle" in str(err):
            raise InputError(
                f"{path}[{name}] holds Python objects, not pixels: {expected}"
            ) from None
        raise InputError(f"{path} cannot be read ({err}): {expected}") from None
    if array.dtype != np.uint8:
        raise InputError(f"{path}[{name}]: expected uint8 pixels 0..255, got {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        hint = " (it looks like N, C, H, W)" if array.ndim == 4 and array.shape[1] in (1, 3) else ""
        raise InputError(
            f"{path}[{name}]: expected (N, H, W, C) with C in {{1, 3}}, got {array.shape}{hint}"
        )
    if len(array) == 0:
        raise InputError(f"{path}[{name}] holds no images")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def load_image_folder(path: str | os.PathLike) -> torch.Tensor:
    """Every PNG/JPEG under `path` (recursively, sorted by path), all of one size.

    Grayscale if every image is grayscale, else RGB (grayscale ones repeated to 3 channels).
    """
    files = sorted(
        p for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise InputError(f"{path}: no {'/'.join(IMAGE_EXTENSIONS)} images found")
    arrays = []
    for file in files:
        # The training data path's reader: bombs refused, truncated files fail here, 16-bit
        # images rescaled to 8 bits (PIL's convert would clip them to 255), alpha over white.
        try:
            image = open_image({"path": str(file), "bytes": None})
            gray = image.mode in _GRAYSCALE_MODES
            arrays.append(np.asarray(to_mode(image, 1 if gray else 3), dtype=np.uint8))
        except Exception as err:  # noqa: BLE001 - malformed files raise all sorts of types
            raise InputError(
                f"{file} cannot be read as an image ({type(err).__name__}: {err}); "
                "remove or replace it: FID over a silently shorter set would mislead"
            ) from None
        if arrays[-1].shape[:2] != arrays[0].shape[:2]:
            raise InputError(
                f"{file} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but {files[0]} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}: all images must have one size"
            )
    if all(a.ndim == 2 for a in arrays):
        stacked = np.stack(arrays)[:, None]
    else:
        rgb = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
        stacked = np.stack(rgb).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))
