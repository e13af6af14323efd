"""The README's pictures of a class-conditional export: a grid with one class per row, and a
guidance sweep (the same seeds at w = 0, 1, 3, 6: one row per w, one column per class). For a
digits model, also how often a classifier fitted on the real digits reads the asked class in
--num-check class-balanced samples at each w (chance: 10%).

    python bench/conditional_panels.py runs/ddpm-cond/pipeline docs/images/conditional
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import digit_accuracy  # noqa: E402
from ddp_utils.images import make_grid, rows_by_label, save_png, to_uint8, upscale  # noqa: E402
from diffusion.kinds.ddpm.samplers import make_inference_scheduler, network_denoiser, sample_ddpm  # noqa: E402
from diffusion.loading import load_for_sampling  # noqa: E402
from diffusion.networks import sample_shape  # noqa: E402
from diffusion.pipeline_code.core import class_condition  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("prefix", help="writes <prefix>-classes.png and <prefix>-guidance.png")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--guidance", default="0,1,3,6")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num-check", type=int, default=500, help="0: no accuracy check")
    parser.add_argument(
        "--grid-guidance", type=float, default=None, help="w of the class grid (the export's)"
    )
    args = parser.parse_args()
    loaded = load_for_sampling(Path(args.model))
    num_classes = loaded.num_classes
    scheduler = make_inference_scheduler("ddim", loaded.scheduler_config)

    def draw(indices: range, guidance: float) -> torch.Tensor:
        labels = torch.tensor([k % num_classes for k in indices])
        null = torch.full_like(labels, num_classes)
        denoiser = network_denoiser(loaded.model, class_condition(labels), class_condition(null),
                                    guidance, scheduler=scheduler)  # fmt: skip
        images, _ = sample_ddpm(
            denoiser, scheduler, sample_shape(loaded.model), indices, args.seed, args.steps, 1.0
        )
        return images

    # One class per row, at the guidance the model was exported with (or --grid-guidance).
    indices = range(num_classes * args.per_class)
    grid_w = loaded.guidance_scale if args.grid_guidance is None else args.grid_guidance
    images = to_uint8(draw(indices, grid_w), loaded.value_range)
    ordered, per_row = rows_by_label(images, [k % num_classes for k in indices], num_classes)
    save_png(upscale(make_grid(ordered, nrow=per_row), 512), f"{args.prefix}-classes.png")
    # The same seeds (samples 0..C-1: one per class) at each guidance scale.
    rows = [draw(range(num_classes), float(w)) for w in args.guidance.split(",")]
    sweep = make_grid(to_uint8(torch.cat(rows), loaded.value_range), nrow=num_classes)
    save_png(upscale(sweep, 512), f"{args.prefix}-guidance.png")
    print(f"wrote {args.prefix}-classes.png and {args.prefix}-guidance.png")
    if args.num_check and num_classes == 10 and loaded.channels == 1:
        print("| guidance w | samples read as the asked digit |\n|---|---|")
        for w in args.guidance.split(","):
            indices = range(args.num_check)
            images = to_uint8(draw(indices, float(w)), loaded.value_range)
            labels = np.array([k % num_classes for k in indices])
            print(f"| {w} | {digit_accuracy(images, labels):.1%} |")


if __name__ == "__main__":
    main()
