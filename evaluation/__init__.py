"""Offline FID and KID, sharded across processes (see `evaluate.py` for the command line)."""

from evaluation.fid import (
    FeatureStats,
    compute_feature_stats,
    extract_features,
    frechet_distance,
    gather_features,
    kernel_inception_distance,
    local_chunks,
    reference_cache_path,
    reference_stats,
    stats_from_features,
)
from evaluation.images import load_images
from evaluation.inception import MISSING_EXTRA_MESSAGE, load_fid_inception
from evaluation.scores import dataset_reference_stats, dataset_stats, default_cache_dir, fid_kid

__all__ = [
    "MISSING_EXTRA_MESSAGE",
    "FeatureStats",
    "compute_feature_stats",
    "dataset_reference_stats",
    "dataset_stats",
    "default_cache_dir",
    "extract_features",
    "fid_kid",
    "frechet_distance",
    "gather_features",
    "kernel_inception_distance",
    "load_fid_inception",
    "load_images",
    "local_chunks",
    "reference_cache_path",
    "reference_stats",
    "stats_from_features",
]
