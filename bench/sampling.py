"""Sampling throughput: DDPM-1000, DDIM-50 and DPM-Solver-20 at several batch sizes.

    python bench/sampling.py                                  # digits-small at 16x16 on CPU
    python bench/sampling.py --preset ddpm-cifar10 --resolution 32 --channels 3 \
        --batch-sizes 64,256,1024 --mixed-precision bf16     # on a GPU

The network is freshly initialised: cost per step does not depend on the weights. Each sampler
runs `diffusion.sampling.sample_ddpm`, the code `sample.py` and the training grids use.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_revision, machine, print_table, synchronize  # noqa: E402
from diffusion.ddpm import make_train_scheduler  # noqa: E402
from diffusion.models import build_ddpm_unet  # noqa: E402
from diffusion.sampling import make_inference_scheduler, sample_ddpm  # noqa: E402

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("dpm-solver", 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits-small")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--mixed-precision", default="no", choices=list(DTYPES))
    parser.add_argument("--samplers", default="ddpm:1000,ddim:50,dpm-solver:20")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = build_ddpm_unet(args.preset, args.resolution, args.channels).to(device).eval()
    train_config = make_train_scheduler("squaredcos_cap_v2", 1000, "epsilon").config
    rows = []
    for spec in args.samplers.split(","):
        name, steps = spec.split(":")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            scheduler = make_inference_scheduler(name, train_config)
            sample_ddpm(
                unet, scheduler, range(batch), 0, 2, 0.0, device, DTYPES[args.mixed_precision]
            )
            synchronize(device)
            start = time.perf_counter()
            sample_ddpm(
                unet, scheduler, range(batch), 0, int(steps), 0.0, device,
                DTYPES[args.mixed_precision],
            )  # fmt: skip
            synchronize(device)
            seconds = time.perf_counter() - start
            rows.append([f"{name}-{steps}", batch, f"{batch / seconds:,.2f}",
                         f"{1000 * seconds / int(steps):,.1f}"])  # fmt: skip
    print(f"\nmachine: {machine()}; git {git_revision()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"preset {args.preset} at {args.resolution}x{args.resolution}x{args.channels}, "
        f"precision {args.mixed_precision}\n"
    )
    print_table(["sampler", "batch", "images/s", "ms/step"], rows)


if __name__ == "__main__":
    main()
