"""A decoded dataset encoded once per node into latents, cached like the decoded images, and
the training batches drawn from them.

Generic over an `Encoder` (what has a fingerprint and turns float images into a posterior's
mean and standard deviation; `diffusion.codecs.LatentCodec` is one). The cache is keyed by the
data's fingerprint (source, resolution, channels, crop), the encoder's (its weights) and the
flip policy; it is written once per node by the local main process, atomically, read back and
verified by every process, and rebuilt (with a warning) when it is damaged or stale.

With random flips, both the images and their mirror images are encoded, so a flip in latent
space is the encoding of the flipped image, exactly. A batch draws z = mean + std * eps with
the micro-step's seeded generator (the flip first, then eps, as the pixel path draws its
flip): resume stays exact and a sample of the posterior is fresh at every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.data.batches import Batch, BatchSource, MemoryBatches
from ddp_utils.data.decode import default_cache_dir
from ddp_utils.data.load import ImageData
from ddp_utils.errors import InputError
from ddp_utils.files import atomic_file

logger = logging.getLogger("ddp_diffusion")

LATENT_CACHE_VERSION = 1
PIXEL_RANGE = (-1.0, 1.0)  # what encoders are given
ENCODE_ROWS = 4096  # images converted to float and handed to the encoder at a time


class Encoder(Protocol):
    fingerprint: str  # changes whenever the encoding would (weights, dtype)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std), float32 on the CPU, of float images in [-1, 1]."""
        ...


@dataclass
class LatentData:
    """Posterior mean and std of every image (float32 (N, c, h, w)), of the mirror images too
    when flips are on; and the affine map a batch applies: z = (sample - shift) * scale."""

    mean: torch.Tensor
    std: torch.Tensor
    flipped_mean: torch.Tensor | None
    flipped_std: torch.Tensor | None
    cache_file: Path
    scale: float = 1.0
    shift: float = 0.0


def latent_cache_key(data: ImageData, encoder: Encoder, random_flip: bool) -> str:
    key = {
        "version": LATENT_CACHE_VERSION,
        "data": data.fingerprint,
        "num_images": data.num_images,
        "encoder": encoder.fingerprint,
        "flips": random_flip,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def read_latent_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when missing, stale or damaged (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            arrays = {name: npz[name] for name in npz.files if name != "key"}
        if not all(np.isfinite(a).all() for a in arrays.values()):
            raise ValueError("non-finite values")
        return arrays
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        logger.warning("latent cache %s is damaged (%s); rebuilding it", path, err)
        return None


def encode_images(images: torch.Tensor, encoder: Encoder, random_flip: bool) -> dict:
    """Encode uint8 images (N, C, H, W) (and their mirror images with flips), ENCODE_ROWS at a
    time: the float copy of a whole dataset never sits in memory."""
    low, high = PIXEL_RANGE
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), ENCODE_ROWS):
        pixels = images[start : start + ENCODE_ROWS].to(torch.float32)
        pixels = pixels * ((high - low) / 255.0) + low
        views = {"": pixels, "flipped_": pixels.flip(3)} if random_flip else {"": pixels}
        for prefix, view in views.items():
            mean, std = encoder.encode(view)
            parts.setdefault(f"{prefix}mean", []).append(mean)
            parts.setdefault(f"{prefix}std", []).append(std)
    return {name: torch.cat(chunks).numpy() for name, chunks in parts.items()}


def check_latents_fit(
    num_images: int, latent_shape: tuple[int, ...], random_flip: bool, memory: int
) -> None:
    """Refuse latents that cannot sit in memory (mean and std, of the mirror images too with
    flips, float32) before encoding any, naming what would fit."""
    per_image = 4 * 2 * (2 if random_flip else 1) * int(np.prod(latent_shape))
    if num_images * per_image > memory // 2:
        gib = 2**30
        fits = max(1, memory // 2 // per_image)
        raise InputError(
            f"the latents of {num_images:,} images take {num_images * per_image / gib:,.1f} "
            f"GiB (posterior mean and std{', both flips' if random_flip else ''}), more than "
            f"half of the {memory / gib:,.1f} GiB here: at most --max-images {fits:,} with "
            "this VAE and resolution",
            "max_images",
        )


def load_latents(
    data: ImageData,
    encoder: Encoder,
    random_flip: bool,
    accelerator: Accelerator | None = None,
    cache_dir: Path | None = None,
) -> LatentData:
    """The data's latents: encoded once per node (the local main process writes the cache,
    the others wait and read it), or read from the cache."""
    key = latent_cache_key(data, encoder, random_flip)
    folder = default_cache_dir() if cache_dir is None else cache_dir
    cache_file = folder / f"latents-{key}.npz"

    def build() -> None:
        if read_latent_cache(cache_file, key) is not None:
            logger.info("latents: reading %s", cache_file)
            return
        logger.info("latents: encoding %d images once into %s", data.num_images, cache_file)
        arrays = encode_images(data.images, encoder, random_flip)
        with atomic_file(cache_file) as f:
            np.savez(f, key=key, **arrays)

    if accelerator is None:
        build()
    else:
        with accelerator.local_main_process_first():
            if accelerator.is_local_main_process:
                build()
    arrays = read_latent_cache(cache_file, key)
    if arrays is None:
        raise RuntimeError(f"latent cache {cache_file} could not be read after it was written")
    tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
    return LatentData(
        tensors["mean"],
        tensors["std"],
        tensors.get("flipped_mean"),
        tensors.get("flipped_std"),
        cache_file,
    )


class LatentBatches(MemoryBatches):
    """Batches of latents: the posterior of every image on the device, one gather per batch,
    then z = (mean + std * eps - shift) * scale with the micro-step's generator. The pixels
    stay on the host (`ImageData.images`: grids of real data, the FID reference)."""

    def __init__(self, data: ImageData, latents: LatentData, *args, **kwargs) -> None:
        # MemoryBatches' batch order (its epoch permutations on the device), not its pixels.
        BatchSource.__init__(self, *args, **kwargs)
        self.images = None
        self.num_images = len(latents.mean)
        self.labels = None if data.labels is None else data.labels.to(self.device)
        self._orders: dict[int, torch.Tensor] = {}
        self.latents = latents
        self.mean, self.std = latents.mean.to(self.device), latents.std.to(self.device)
        self.flipped = None
        if self.random_flip:
            assert latents.flipped_mean is not None, "flips need the mirror images' latents"
            self.flipped = (latents.flipped_mean.to(self.device),
                            latents.flipped_std.to(self.device))  # fmt: skip

    def get(self, micro_step: int, generator: torch.Generator) -> Batch:
        index = self.indices(micro_step, self.num_images)
        mean, std = self.mean[index], self.std[index]
        if self.flipped is not None:  # drawn first, as the pixel path's flip
            flip = torch.rand(len(index), generator=generator, device=self.device) < 0.5
            flip = flip[:, None, None, None]
            mean = torch.where(flip, self.flipped[0][index], mean)
            std = torch.where(flip, self.flipped[1][index], std)
        eps = torch.randn(mean.shape, generator=generator, device=self.device)
        z = (mean + std * eps - self.latents.shift) * self.latents.scale
        return Batch(z, None if self.labels is None else self.labels[index])
