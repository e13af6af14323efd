"""Offline FID and KID, sharded across processes (see `evaluate.py` for the command line).

One image set's path through the package: `images` loads it (uint8 N, C, H, W),
`features` extracts Inception features chunk by chunk on every process and gathers them,
`stats` summarizes them (`FeatureStats`), `reference` caches a dataset's statistics on disk,
`metrics` turns two statistics into FID and KID, and `score` is what every script calls:
samples (held or made on the fly) against a `Reference`, overall and per class.
`during_training` is the evaluator a training script hands to the loop (imported from there,
not here: it needs the training run's types).
"""

from evaluation.features import (
    compute_feature_stats,
    extract_features,
    generated_feature_stats,
    generated_features,
    image_features,
)
from evaluation.images import load_images
from evaluation.inception import MISSING_EXTRA_MESSAGE, load_fid_inception
from evaluation.metrics import fid_kid, frechet_distance, kernel_inception_distance
from evaluation.reference import (
    Reference,
    dataset_reference,
    dataset_reference_stats,
    default_cache_dir,
    reference_cache_path,
    reference_stats,
)
from evaluation.score import per_class_scores, score
from evaluation.stats import FeatureStats, stats_from_features

__all__ = [
    "MISSING_EXTRA_MESSAGE",
    "FeatureStats",
    "Reference",
    "compute_feature_stats",
    "dataset_reference",
    "dataset_reference_stats",
    "default_cache_dir",
    "extract_features",
    "fid_kid",
    "frechet_distance",
    "generated_feature_stats",
    "generated_features",
    "image_features",
    "kernel_inception_distance",
    "load_fid_inception",
    "load_images",
    "per_class_scores",
    "reference_cache_path",
    "reference_stats",
    "score",
    "stats_from_features",
]
