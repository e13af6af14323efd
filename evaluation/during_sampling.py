"""`sample.py --fid`: the reference its flags name and the scores of the samples against it
(fid.json), through the one `score` every path uses; `sample.py --clip-model`: the samples'
CLIP score against their prompts (clip_score.json), sharded as training's."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from evaluation.clip_score import ClipScorer, clip_score
from evaluation.reference import Reference, dataset_reference
from evaluation.score import score


def fid_reference(
    cfg: Any, loaded: Any, extractor: torch.nn.Module, accelerator: Accelerator
) -> Reference:
    """--fid's reference: `--dataset` at the model's resolution and channels, with its classes
    for --per-class-fid (collective; its statistics cached and shared with evaluate.py and
    training). Read before sampling: a bad --dataset is refused before anything is written."""
    assert cfg.dataset is not None  # SampleConfig: --fid needs --dataset
    return dataset_reference(
        cfg.dataset,
        loaded.resolution,
        loaded.channels,
        dataset_config=cfg.dataset_config,
        split=cfg.split,
        max_images=cfg.max_reference,
        extractor=extractor,
        accelerator=accelerator,
        batch_size=cfg.batch_size,
        with_classes=cfg.per_class_fid,
    )


def fid_metrics(
    cfg: Any,
    loaded: Any,
    images: np.ndarray,
    labels: np.ndarray | None,
    extractor: torch.nn.Module,
    reference: Reference,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """fid.json: FID/KID of the samples against the reference (and of each class with
    --per-class-fid), sharded like the sampling (collective)."""
    samples = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW uint8
    metrics = score(
        samples,
        reference,
        extractor,
        accelerator,
        cfg.batch_size,
        cfg.seed,
        labels=labels if cfg.per_class_fid else None,
        class_names=loaded.class_names or [],
        progress="FID features",
    )
    per_class = metrics.pop("per_class", None)
    metrics["reference"] = (
        f"{cfg.dataset} ({cfg.split}, {loaded.resolution}x{loaded.resolution}, "
        f"{loaded.channels} ch)"
    )
    if per_class is not None:
        metrics["per_class"] = per_class
    return metrics


def clip_metrics(
    cfg: Any,
    images: np.ndarray,
    condition: Any,
    scorer: ClipScorer,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """clip_score.json: the mean CLIP score of the samples (NHWC uint8), sample k against its
    prompt (`condition.prompts_of`), sharded like the sampling (collective)."""
    samples = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW uint8
    value = clip_score(samples, condition.prompts_of, scorer, accelerator, cfg.batch_size)
    return {
        "clip_score": value,
        "num_samples": len(images),
        "clip_model": cfg.clip_model,
        "prompts": list(condition.prompts.texts),
    }
