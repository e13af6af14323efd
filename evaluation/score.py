"""Scoring generated images against a reference: FID, KID and, for labelled samples, both per
class. evaluate.py, sample.py --fid and training (--eval-every) all score through `score`, so
the same images against the same reference give the same numbers whichever script reports them.

The samples are either held (uint8 N, C, H, W) or made on the fly by `generate(items)` (training
draws them from fixed seeds at each evaluation without keeping them). Either way chunk k of
`batch_size` images is made and embedded on rank k % world (`ddp_utils.distributed`'s sharding)
and only features are gathered, so the numbers do not depend on the number of processes. The
scores per class split the same features by label: each sample is embedded once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from evaluation.features import generated_features, image_features
from evaluation.inception import load_fid_inception
from evaluation.metrics import fid_kid
from evaluation.reference import Reference
from evaluation.stats import stats_from_features

ImageSource = torch.Tensor | np.ndarray | Callable[[range], torch.Tensor]


def score(
    samples: ImageSource,
    reference: Reference,
    extractor: nn.Module | None = None,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    seed: int = 0,
    num_samples: int | None = None,
    labels: np.ndarray | None = None,
    class_names: list[str] | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    progress: str | None = None,
) -> dict[str, Any]:
    """FID and KID of `samples` against `reference` (collective: call on every rank).

    `samples`: uint8 (N, C, H, W) images, or `generate(items)` making the images of the item
    indices `items` (then `num_samples` says how many). With `labels` (the class of each
    sample; ids into `class_names`, by default the reference's) the result has a `per_class`
    table as well, against the reference's images of each class. `seed` draws the KID subsets.

    Returns {fid, kid_mean, kid_std, num_samples, num_reference, kid_subset_size[, per_class]},
    the same on every rank.
    """
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    if extractor is None:
        extractor = load_fid_inception(device)
    if callable(samples):
        if num_samples is None:
            raise ValueError("a generator of samples needs num_samples")
        generate = samples
    else:
        images = torch.as_tensor(samples)
        num_samples = len(images)

        def generate(items: range) -> torch.Tensor:
            return images[items.start : items.stop]

    features = generated_features(
        generate, num_samples, extractor, accelerator, batch_size, progress
    )
    metrics = fid_kid(
        stats_from_features(features), reference.stats, kid_subsets, kid_subset_size, seed, device
    )
    if labels is not None:
        metrics["per_class"] = per_class_scores(
            features, labels, reference, extractor, accelerator, batch_size, seed, class_names
        )
    return metrics


def per_class_scores(
    sample_features: torch.Tensor,
    sample_labels: np.ndarray,
    reference: Reference,
    extractor: nn.Module,
    accelerator: Accelerator | None = None,
    batch_size: int = 250,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """{class name: FID/KID of that class's samples vs the reference images of that class}.

    The overall FID of class-balanced samples says how good the set is; per class, which
    classes the model draws worse. A class with fewer than 2 images on either side has no
    score (left out). Collective: the reference images' features are extracted sharded.
    """
    if reference.images is None or reference.labels is None:
        raise ValueError("scores per class need a reference with its images and classes")
    names = reference.class_names if class_names is None else class_names
    device = accelerator.device if accelerator is not None else "cpu"
    reference_features = image_features(
        reference.images, extractor, accelerator, batch_size, "reference features"
    )
    scores = {}
    for k, name in enumerate(names or []):
        mine = sample_features[torch.from_numpy(np.asarray(sample_labels) == k)]
        theirs = reference_features[torch.from_numpy(np.asarray(reference.labels) == k)]
        if len(mine) < 2 or len(theirs) < 2:
            continue
        scores[name] = fid_kid(
            stats_from_features(mine), stats_from_features(theirs), seed=seed, device=device
        )
    return scores
