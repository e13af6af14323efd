"""What classifier-free guidance costs per image: DDIM sampling with w = 1 (one conditional
forward per step) against w = 3 (conditional and unconditional in one batched forward).

    python bench/guidance_cost.py                                    # digits-small, 16x16x1
    python bench/guidance_cost.py --preset ddpm-cifar10 --resolution 32 --channels 3 --batch-size 256

A freshly initialised class-conditional UNet (10 classes): the cost does not depend on the
weights. Rounds alternate guided and unguided; medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_revision, machine, print_table, synchronize  # noqa: E402
from diffusion.kinds.ddpm.formulation import make_train_scheduler  # noqa: E402
from diffusion.kinds.ddpm.samplers import make_inference_scheduler, network_denoiser, sample_ddpm  # noqa: E402
from diffusion.networks import sample_shape  # noqa: E402
from diffusion.networks.unet import build_ddpm_unet  # noqa: E402
from diffusion.pipeline_code.core import class_condition  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits-small")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_ddpm_unet(args.preset, args.resolution, args.channels, num_classes=10)
    model = model.to(device).eval()
    scheduler = make_inference_scheduler("ddim", make_train_scheduler().config)
    indices = range(args.batch_size)
    labels = torch.tensor([k % 10 for k in indices])
    rates: dict[float, list[float]] = {1.0: [], 3.0: []}
    for _ in range(args.rounds):
        for w in rates:
            synchronize(device)
            start = time.perf_counter()
            labels = labels.to(device)
            denoiser = network_denoiser(
                model,
                class_condition(labels),
                class_condition(torch.full_like(labels, 10)),
                w,
                scheduler=scheduler,
            )
            sample_ddpm(
                denoiser, scheduler, sample_shape(model), indices, 0, args.steps, 0.0, device
            )
            synchronize(device)
            rates[w].append(args.batch_size / (time.perf_counter() - start))
    print(f"machine: {machine()}; git {git_revision()}; {vars(args)}")
    unguided, guided = (statistics.median(rates[w]) for w in (1.0, 3.0))
    print_table(
        ["sampling", "images/s", "cost per image vs unguided"],
        [["w = 1 (unguided)", unguided, 1.0], ["w = 3 (guided)", guided, unguided / guided]],
    )


if __name__ == "__main__":
    main()
