"""Inception features of an image set, extracted in chunks sharded across processes.

Sharding is the project's one rule (`ddp_utils.distributed.map_sharded`): the images are cut
into chunks of `batch_size`, chunk k is extracted on rank k % world_size, and the features
are gathered back in image order. A chunk holds the same images whatever the number of
processes, so the statistics are the same on 1 or N processes (up to float round-off).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ddp_utils.distributed import map_sharded
from evaluation.inception import load_fid_inception
from evaluation.stats import MAX_KID_FEATURES, FeatureStats, stats_from_features


def extract_features(images: torch.Tensor | np.ndarray, extractor: nn.Module) -> torch.Tensor:
    """One batch of uint8 (N, C, H, W) images -> float32 (N, D) features on the CPU."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            "expected uint8 images (N, C, H, W) with C in {1, 3}, "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    with torch.inference_mode():
        return extractor(images).to("cpu", torch.float32)


def generated_features(
    generate: Callable[[range], torch.Tensor],
    num_items: int,
    extractor: nn.Module | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    progress: str | None = None,
) -> torch.Tensor:
    """The features (num_items, D) of `num_items` images made on the fly, e.g. by a model.

    `generate(items)` returns the uint8 (len(items), C, H, W) images of the item indices
    `items`; it is called only for this rank's chunks of `batch_size` items, so each image is
    made once, on one process, and only its features cross processes. With per-item seeds
    the features do not depend on the number of processes. Collective: call on every rank;
    every rank returns all the features, in item order. `extractor` defaults to the FID
    Inception-v3 on `accelerator.device` (or the CPU). `progress` names a progress bar (main
    process only).
    """
    if num_items < 2:
        raise ValueError(f"feature statistics need at least 2 images, got {num_items}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if extractor is None:
        extractor = load_fid_inception(accelerator.device if accelerator is not None else "cpu")

    def chunk_features(items: range) -> torch.Tensor:
        images = generate(items)
        if len(images) != len(items):
            raise ValueError(f"generate({items}) returned {len(images)} images")
        return extract_features(images, extractor)

    return map_sharded(accelerator, num_items, batch_size, chunk_features, progress)


def generated_feature_stats(
    generate: Callable[[range], torch.Tensor],
    num_items: int,
    extractor: nn.Module | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    max_kid_features: int = MAX_KID_FEATURES,
    progress: str | None = None,
) -> FeatureStats:
    """Feature statistics of `num_items` images made on the fly (`generated_features`)."""
    features = generated_features(generate, num_items, extractor, accelerator, batch_size, progress)
    return stats_from_features(features, max_kid_features)


def image_features(
    images: torch.Tensor | np.ndarray,
    extractor: nn.Module,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    progress: str | None = None,
) -> torch.Tensor:
    """The features (N, D) of a whole uint8 (N, C, H, W) image set, sharded (collective)."""
    images = torch.as_tensor(images)

    def chunk_features(items: range) -> torch.Tensor:
        return extract_features(images[items.start : items.stop], extractor)

    return map_sharded(accelerator, len(images), batch_size, chunk_features, progress)


def compute_feature_stats(
    images: torch.Tensor | np.ndarray,
    extractor: nn.Module | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    max_kid_features: int = MAX_KID_FEATURES,
    progress: str | None = None,
) -> FeatureStats:
    """Feature statistics of a whole uint8 (N, C, H, W) image set held by every rank.

    Rank r extracts chunks k = r, r + world, ... of `batch_size` images; features are
    gathered so that every rank returns the same statistics. Collective.
    """
    images = torch.as_tensor(images)
    return generated_feature_stats(
        lambda items: images[items.start : items.stop],
        len(images),
        extractor,
        accelerator,
        batch_size,
        max_kid_features,
        progress,
    )
