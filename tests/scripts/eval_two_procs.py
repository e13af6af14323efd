"""Feature statistics of fixed digit images under Accelerate, written for comparison across runs.

    ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \
        --main_process_port 0 tests/scripts/eval_two_procs.py OUTDIR
    OMP_NUM_THREADS=1 python tests/scripts/eval_two_procs.py OUTDIR --expect-processes 1

Writes OUTDIR/result.npz (rank 0): mu, features (all rows, in image order) of set A, FID(A, A),
FID(A, B), KID(A, B), and the features of A made on the fly by `generated_feature_stats` (the
sampling path); and OUTDIR/generated_items.json: the item ranges each rank was asked to make,
{rank: [[start, stop], ...]}. 18 images in chunks of 4: 5 chunks, the last one short, so with
2 processes rank 0 has 3 chunks and rank 1 has 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from sklearn.datasets import load_digits

from evaluation import (
    compute_feature_stats,
    frechet_distance,
    generated_feature_stats,
    kernel_inception_distance,
    load_fid_inception,
)

NUM_IMAGES = 18
BATCH_SIZE = 4


def digit_images(start: int, count: int) -> torch.Tensor:
    pixels = load_digits().images[start : start + count]  # (n, 8, 8), values 0..16
    pixels = np.round(pixels * 255 / 16).astype(np.uint8).repeat(4, axis=1).repeat(4, axis=2)
    return torch.from_numpy(pixels[:, None])  # (n, 1, 32, 32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--expect-processes", type=int, default=2)
    args = parser.parse_args()

    accelerator = Accelerator()
    assert accelerator.num_processes == args.expect_processes, (
        f"launched {accelerator.num_processes} processes, expected {args.expect_processes}"
    )
    extractor = load_fid_inception(accelerator.device)
    images_a = digit_images(0, NUM_IMAGES)
    images_b = digit_images(500, NUM_IMAGES)

    stats_a = compute_feature_stats(images_a, extractor, accelerator, BATCH_SIZE)
    stats_b = compute_feature_stats(images_b, extractor, accelerator, BATCH_SIZE)
    # The sampling path: images made on the fly, each rank making only its own chunks.
    requested: list[list[int]] = []

    def generate(items: range) -> torch.Tensor:
        requested.append([items.start, items.stop])
        return images_a[items.start : items.stop]

    stats_a_generated = generated_feature_stats(
        generate, NUM_IMAGES, extractor, accelerator, BATCH_SIZE
    )
    requested_per_rank = gather_object([(accelerator.process_index, requested)])

    if accelerator.is_main_process:
        args.outdir.mkdir(parents=True, exist_ok=True)
        np.savez(
            args.outdir / "result.npz",
            num_processes=accelerator.num_processes,
            mu=stats_a.mu,
            features=stats_a.features,
            features_generated=stats_a_generated.features,
            fid_self=frechet_distance(stats_a, stats_a),
            fid_ab=frechet_distance(stats_a, stats_b),
            kid_ab=np.array(kernel_inception_distance(stats_a, stats_b, num_subsets=20)),
        )
        (args.outdir / "generated_items.json").write_text(
            json.dumps({str(rank): ranges for rank, ranges in requested_per_rank})
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
