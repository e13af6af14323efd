"""FID and KID of each class of a class-conditional model: its samples of class c against the
reference images of class c (the overall FID of class-balanced samples says how good the set is;
per class, which classes the model draws worse)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from evaluation.features import image_features
from evaluation.metrics import fid_kid
from evaluation.stats import stats_from_features


def per_class_fid_kid(
    samples: torch.Tensor,
    sample_labels: np.ndarray,
    reference: torch.Tensor,
    reference_labels: np.ndarray,
    class_names: list[str],
    extractor: nn.Module,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """{class name: FID/KID of that class's samples vs its reference images} (collective).

    Uint8 (N, C, H, W) images; features are extracted once per set, sharded, then split by
    class. A class with fewer than 2 images on either side has no score (left out).
    """
    device = accelerator.device if accelerator is not None else "cpu"
    sample_features = image_features(samples, extractor, accelerator, batch_size, "sample features")
    reference_features = image_features(
        reference, extractor, accelerator, batch_size, "reference features"
    )
    scores = {}
    for k, name in enumerate(class_names):
        mine = sample_features[torch.from_numpy(np.asarray(sample_labels) == k)]
        theirs = reference_features[torch.from_numpy(np.asarray(reference_labels) == k)]
        if len(mine) < 2 or len(theirs) < 2:
            continue
        scores[name] = fid_kid(
            stats_from_features(mine), stats_from_features(theirs), seed=seed, device=device
        )
    return scores
