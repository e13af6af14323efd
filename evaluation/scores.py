"""What evaluate.py, sample.py --fid and train_ddpm.py --eval-every share: dataset reference
statistics under one cache key, and the FID/KID numbers of one sample set against them.

One key for all three means a training run, `sample.py --fid` and `evaluate.py --dataset`
at the same resolution and channels reuse each other's cached reference statistics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from evaluation.fid import (
    FeatureStats,
    frechet_distance,
    kernel_inception_distance,
    reference_stats,
)

if TYPE_CHECKING:
    from accelerate import Accelerator


def default_cache_dir() -> Path:
    """$DDP_DIFFUSION_CACHE/fid-stats, else ~/.cache/ddp-diffusion/fid-stats."""
    root = os.environ.get("DDP_DIFFUSION_CACHE", Path.home() / ".cache" / "ddp-diffusion")
    return Path(root) / "fid-stats"


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


def dataset_stats(
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
) -> FeatureStats:
    """`--dataset` decoded by the training data pipeline, then its cached statistics (collective)."""
    from ddp_utils.data import load_image_data  # imported here: only this path needs datasets

    data = load_image_data(
        dataset,
        resolution,
        channels,
        dataset_config=dataset_config,
        split=split,
        max_images=max_images,
        accelerator=accelerator,
    )
    return dataset_reference_stats(
        data.images, dataset, data.fingerprint, cache_dir, extractor, accelerator, batch_size
    )


def fid_kid(
    samples: FeatureStats,
    reference: FeatureStats,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """FID and KID (mean, std) of `samples` against `reference`, with the counts behind them.

    No collectives: every rank that holds the statistics gets the same numbers.
    """
    kid_mean, kid_std = kernel_inception_distance(
        samples, reference, kid_subsets, kid_subset_size, seed, device=device
    )
    return {
        "fid": frechet_distance(samples, reference),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_samples": samples.num_images,
        "num_reference": reference.num_images,
        "kid_subset_size": min(kid_subset_size, len(samples.features), len(reference.features)),
    }
