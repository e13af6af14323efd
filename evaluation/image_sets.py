"""What `evaluate.py` scores: its options, and the sample and reference sets they name (an .npz,
an image folder, `sample.py`'s output folder, or a dataset at the samples' size)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.config import option
from ddp_utils.data.source import NATIVE_RESOLUTION
from ddp_utils.errors import InputError
from ddp_utils.export import TASK_FILE
from evaluation.images import load_images
from evaluation.reference import Reference, dataset_reference

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


AUTOENCODER_TASK = "autoencoder"  # what train_autoencoder.py's export records in task.json
EXPORT_NAMES = ("pipeline", "model")  # a run directory's export folder (diffusion, the others)


def image_set_path(path: str, flag: str) -> Path:
    """The file or folder to read for `path`: sample.py's output folder means its samples.npz
    (not its grid.png); a training run directory, its folder of grids, a model (an export, a
    pipeline, a checkpoint) are refused, saying what they are (a grid holds many samples per
    picture: a silently wrong FID) and how to make samples, or that there are none to make."""
    folder = Path(path)
    if not folder.is_dir():
        return folder
    if (folder / "samples.npz").is_file():
        return folder / "samples.npz"
    if _is_run_directory(folder):
        what, source, task = "a training run directory", folder, _run_task(folder)
    elif _is_run_directory(folder.parent) and folder.name == "samples":
        what, source, task = "a training run's grids", folder.parent, _run_task(folder.parent)
    elif any((folder / name).is_file() for name in (TASK_FILE, "model_index.json", "state.json")):
        what, source, task = "a model (an export, pipeline or checkpoint)", folder, _task(folder)
    else:
        return folder
    if task == AUTOENCODER_TASK:
        raise InputError(
            f"{flag}: {path} is {what} of an autoencoder (train_autoencoder.py): it encodes and "
            "decodes images but generates none, so there are no samples to score (its "
            "held-out reconstructions are scored in its export's reconstruction.json, PSNR and "
            "SSIM); samples come from a diffusion model, e.g. a latent run trained on it (--vae)"
        )
    samples = (source if source.name not in EXPORT_NAMES else source.parent) / "samples-1000"
    raise InputError(
        f"{flag}: {path} is {what}, not a set of samples: draw samples first, e.g. "
        f"`python sample.py {source} --num-samples 1000 --output-dir {samples}`, then "
        f"{flag} {samples}"
    )


def _is_run_directory(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and any(
        (folder / name).is_dir() for name in ("checkpoints", *EXPORT_NAMES)
    )


def _task(folder: Path) -> str | None:
    """The task a model folder's task.json records (None: none, or unreadable)."""
    try:
        return str(json.loads((folder / TASK_FILE).read_text())["task"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_task(run_dir: Path) -> str | None:
    """The task of a run directory's model: its export's, else its newest checkpoint's."""
    for name in EXPORT_NAMES:
        if (task := _task(run_dir / name)) is not None:
            return task
    checkpoints = sorted(run_dir.glob("checkpoints/checkpoint-*/state.json"))
    for state in checkpoints:
        try:
            return str(json.loads(state.read_text())["task"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def load_image_set(path: str, flag: str) -> torch.Tensor:
    """`load_images`, its errors naming the flag the path came from; a set of fewer than two
    images is refused (FID's covariance needs two)."""
    try:
        images = load_images(image_set_path(path, flag))
    except InputError as err:
        raise InputError(str(err) if str(err).startswith(flag) else f"{flag}: {err}") from None
    if len(images) < 2:
        raise InputError(
            f"{flag}: {path} holds {len(images)} image(s): FID and KID need at least 2 (a "
            "covariance of their features; thousands for a number worth comparing)"
        )
    return images


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
