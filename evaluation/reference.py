"""Reference statistics (a dataset's features), cached on disk under a key describing them.

Extracting a dataset's features takes minutes; every FID against it needs the same numbers.
evaluate.py, sample.py --fid and training-time evaluation build the same key for the same
dataset, resolution and channels, so they reuse each other's cached statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ddp_utils.data import load_image_data
from ddp_utils.data.decode import cache_fix
from ddp_utils.data.decode import default_cache_dir as data_cache_dir
from evaluation.features import compute_feature_stats
from evaluation.inception import EXTRACTOR_ID
from evaluation.stats import (
    MAX_KID_FEATURES,
    STATS_FORMAT_VERSION,
    FeatureStats,
    canonical_json,
)

logger = logging.getLogger("ddp_diffusion")


def default_cache_dir() -> Path:
    """`fid-stats/` in the project's cache (ddp_utils.data.decode.default_cache_dir:
    $DDP_DIFFUSION_CACHE, else $XDG_CACHE_HOME/ddp-diffusion, else ~/.cache/ddp-diffusion)."""
    return data_cache_dir() / "fid-stats"


def reference_cache_path(cache_dir: str | os.PathLike, key: dict[str, Any]) -> Path:
    """Cache file for a full key: the file name is a hash of the key's canonical JSON."""
    digest = hashlib.sha256(canonical_json(key).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"ref-stats-{digest}.npz"


def _full_key(
    key: dict[str, Any], extractor: nn.Module | None, max_kid_features: int
) -> dict[str, Any]:
    """The caller's key plus what else changes the numbers: extractor, KID rows, file format."""
    full = {
        **key,
        "extractor": EXTRACTOR_ID
        if extractor is None
        else getattr(extractor, "name", type(extractor).__qualname__),
        "max_kid_features": max_kid_features,
        "stats_format": STATS_FORMAT_VERSION,
    }
    # Normalized through JSON so that a loaded key (lists, not tuples) compares equal.
    return json.loads(canonical_json(full))


def _read_matching(path: Path, key: dict[str, Any], num_images: int) -> FeatureStats | None:
    """The cached statistics if the file is intact and describes exactly `key`, else None."""
    try:
        stats = FeatureStats.load(path)
    except (FileNotFoundError, ValueError):
        return None
    if stats.key != key or stats.num_images != num_images:
        return None
    return stats


def _main_process_verdict(hit: bool, accelerator: Accelerator | None) -> bool:
    """Rank 0's cache verdict on every rank: all ranks must agree to compute (collectively)."""
    if accelerator is None or accelerator.num_processes == 1:
        return hit
    flag = torch.tensor([int(hit)], device=accelerator.device)
    return bool(accelerator.gather(flag)[0])


def reference_stats(
    images: torch.Tensor | np.ndarray,
    cache_dir: str | os.PathLike,
    key: dict[str, Any],
    extractor: nn.Module | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    max_kid_features: int = MAX_KID_FEATURES,
) -> FeatureStats:
    """Statistics of a reference set (a dataset), cached on disk under a hash of `key`.

    `key` must identify the images: dataset fingerprint, resolution, channels, image count
    (the caller's). The extractor's name and the stats format are added to it. The file stores
    the key and is used only if it loads and its key and image count match; otherwise the
    statistics are recomputed (sharded) and the main process rewrites the file atomically.
    Collective: the main process decides hit or miss for everyone (no rank can compute alone),
    so `cache_dir` must be visible to all processes (a shared filesystem on multi-node runs).
    """
    full_key = _full_key(key, extractor, max_kid_features)
    path = reference_cache_path(cache_dir, full_key)
    num_images = len(images)
    is_main = accelerator is None or accelerator.is_main_process

    cached = _read_matching(path, full_key, num_images) if is_main else None
    if _main_process_verdict(cached is not None, accelerator):
        if cached is None:
            cached = _read_matching(path, full_key, num_images)
        if cached is None:
            rank = accelerator.process_index if accelerator is not None else 0
            raise RuntimeError(
                f"the main process found reference statistics at {path} but process {rank} "
                "cannot read them: the cache directory must be shared by all processes"
            )
        return cached

    stats = compute_feature_stats(
        images, extractor, accelerator, batch_size, max_kid_features, "reference features"
    )
    stats.key = full_key
    if is_main:
        try:
            stats.save(path)
        except OSError as err:  # full or read-only: the cache is a saving, not a need
            logger.warning(
                "could not cache the reference statistics at %s (%s): they are computed again "
                "next time; to keep them, %s",
                path, err.strerror or err, cache_fix(),
            )  # fmt: skip
    if accelerator is not None:
        # Every rank computed the same statistics; waiting only keeps later readers of the
        # file (the next evaluation) from racing the rename.
        accelerator.wait_for_everyone()
    return stats


def dataset_reference_stats(
    images: torch.Tensor,
    dataset: str,
    fingerprint: str,
    cache_dir: str | os.PathLike | None = None,
    extractor: nn.Module | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
) -> FeatureStats:
    """Cached statistics of a decoded dataset, uint8 (N, C, H, W) (collective).

    `fingerprint` is the one `ddp_utils.data.load_image_data` gives the decoded images; the
    resolution, channels and image count complete the key, so a change of any recomputes.
    """
    key = {
        "dataset": dataset,
        "fingerprint": fingerprint,
        "resolution": int(images.shape[-1]),
        "channels": int(images.shape[1]),
        "num_images": len(images),
    }
    return reference_stats(
        images,
        Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        key,
        extractor=extractor,
        accelerator=accelerator,
        batch_size=batch_size,
    )


@dataclass
class Reference:
    """What generated images are scored against: its feature statistics and, for scores per
    class, its images with their classes."""

    stats: FeatureStats
    images: torch.Tensor | None = None
    """uint8 (N, C, H, W), kept only where scores per class need them."""
    labels: np.ndarray | None = None
    """The class of each image (ids into `class_names`)."""
    class_names: list[str] | None = None


def dataset_reference(
    dataset: str,
    resolution: int,
    channels: int,
    dataset_config: str | None = None,
    split: str = "train",
    max_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    extractor: nn.Module | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    with_classes: bool = False,
) -> Reference:
    """A dataset decoded by the training data pipeline, and its cached statistics (collective).

    Decoding through the same pipeline as training (resize, crop, channels) is what makes
    the reference the distribution the model was trained to match. `with_classes` keeps the
    images and their labels for scores per class (a dataset without labels is refused now,
    naming --dataset); the statistics are the same either way (one decoded-image cache).
    """
    data = load_image_data(
        dataset,
        resolution,
        channels,
        dataset_config=dataset_config,
        split=split,
        max_images=max_images,
        accelerator=accelerator,
        with_labels=with_classes,
    )
    stats = dataset_reference_stats(
        data.images, dataset, data.fingerprint, cache_dir, extractor, accelerator, batch_size
    )
    if not with_classes:
        return Reference(stats)
    assert data.labels is not None  # load_image_data(with_labels=True) refuses a dataset without
    return Reference(stats, data.images, data.labels.numpy(), data.class_names or [])
