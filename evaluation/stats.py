"""Feature statistics of one image set: what FID (mu, sigma) and KID (raw features) need.

They are computed once per set and kept in an .npz (the reference statistics cache), so the
file format is versioned and a file that does not load is reported, never half-read.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ddp_utils.files import atomic_file

STATS_FORMAT_VERSION = 1
# KID draws its subsets (1000 rows by default) from at most this many rows: the cached file
# stays under ~80 MB at D=2048 whatever the size of the dataset.
MAX_KID_FEATURES = 10_000


def canonical_json(obj: Any) -> str:
    """One spelling per value (sorted keys, no spaces): statistics keys are compared and hashed."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise ValueError(f"the statistics key must be JSON-serializable: {err}") from err


@dataclass
class FeatureStats:
    """Summary of one image set's features: enough for FID (mu, sigma) and KID (features)."""

    mu: np.ndarray
    """Mean feature, float64 (D,)."""
    sigma: np.ndarray
    """Feature covariance (unbiased, as np.cov), float64 (D, D)."""
    num_images: int
    """Number of images the statistics were computed from."""
    features: np.ndarray
    """Raw features for KID, float32 (M, D): all rows, or a seeded subset of MAX_KID_FEATURES."""
    key: dict[str, Any] = field(default_factory=dict)
    """What the statistics describe (dataset fingerprint, resolution, extractor...); may be empty."""

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        self.features = np.asarray(self.features, dtype=np.float32)
        self.num_images = int(self.num_images)
        dim = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (dim, dim):
            raise ValueError(
                f"mu {self.mu.shape} and sigma {self.sigma.shape} must be (D,), (D, D)"
            )
        if self.features.ndim != 2 or self.features.shape[1] != dim:
            raise ValueError(f"features {self.features.shape} must be (M, {dim})")
        if not 0 < len(self.features) <= self.num_images:
            raise ValueError(f"{len(self.features)} feature rows for {self.num_images} images")

    @property
    def has_all_features(self) -> bool:
        """Whether `features` holds every image's row (not a KID subset): FID's "gram" needs it."""
        return len(self.features) == self.num_images

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz atomically: a reader (the next evaluation) never sees half a file."""
        with atomic_file(path) as f:
            np.savez(
                f,
                format_version=np.int64(STATS_FORMAT_VERSION),
                mu=self.mu,
                sigma=self.sigma,
                num_images=np.int64(self.num_images),
                features=self.features,
                key_json=np.str_(canonical_json(self.key)),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a file written by `save`; ValueError if it is damaged or not such a file."""
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != STATS_FORMAT_VERSION:
                    raise ValueError(f"format version {version}, expected {STATS_FORMAT_VERSION}")
                return cls(
                    mu=data["mu"],
                    sigma=data["sigma"],
                    num_images=int(data["num_images"]),
                    features=data["features"],
                    key=json.loads(str(data["key_json"])),
                )
        except FileNotFoundError:
            raise
        except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a readable FeatureStats file: {err}") from err


def stats_from_features(
    features: torch.Tensor | np.ndarray,
    max_kid_features: int = MAX_KID_FEATURES,
    key: dict[str, Any] | None = None,
) -> FeatureStats:
    """mu and sigma in float64 (float32 sums lose digits FID needs), plus a seeded KID subset.

    The subset is drawn with a fixed seed, so the same features always give the same file.
    """
    feats = np.asarray(torch.as_tensor(features).cpu(), dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need features (N >= 2, D), got {feats.shape}")
    subset = feats
    if len(feats) > max_kid_features:
        rows = np.sort(np.random.default_rng(0).choice(len(feats), max_kid_features, replace=False))
        subset = feats[rows]
    return FeatureStats(
        mu=feats.mean(axis=0),
        sigma=np.cov(feats, rowvar=False),
        num_images=len(feats),
        features=subset.astype(np.float32),
        key=dict(key or {}),
    )
