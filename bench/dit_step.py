"""CPU cost of one DiT training step next to the default UNet's, to size the DiT presets.

    python bench/dit_step.py                                   # dit-digits vs digits-small
    python bench/dit_step.py --presets dit-digits,my_dit.json --repeats 9

One step is what training does per batch: forward, MSE against the noise, backward, AdamW
step, on a batch of 64 16x16 grayscale images with 10 classes, on one torch thread. Each model
is timed in rounds that alternate between models, so a shared machine slows all of them alike;
the table reports the median over rounds of the thread's CPU time per step (what the step
costs, less sensitive to other processes than wall time, also shown).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_revision, machine, print_table  # noqa: E402
from diffusion.networks import count_parameters  # noqa: E402
from diffusion.networks.dit import build_dit  # noqa: E402
from diffusion.networks.unet import build_ddpm_unet  # noqa: E402

UNET_PRESET = "digits-small"


def build(name: str, args: argparse.Namespace) -> torch.nn.Module:
    if name == UNET_PRESET:
        return build_ddpm_unet(name, args.resolution, args.channels, args.num_classes)
    return build_dit(name, args.resolution, args.channels, args.num_classes)


def time_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, steps: int):
    """(CPU seconds, wall seconds) per training step, averaged over `steps` steps."""
    x, t, labels, noise = batch
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        prediction = model(x, t, class_labels=labels, return_dict=False)[0]
        F.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.thread_time() - cpu) / steps, (time.perf_counter() - wall) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--presets", default="dit-digits", help="DiT presets or JSON files, comma-separated"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    names = [UNET_PRESET, *args.presets.split(",")]
    models = {name: build(name, args).train() for name in names}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    shape = (args.batch_size, args.channels, args.resolution, args.resolution)
    batch = (
        torch.randn(shape),
        torch.randint(0, 1000, (args.batch_size,)),
        torch.randint(0, args.num_classes, (args.batch_size,)),
        torch.randn(shape),
    )
    for name in names:  # warm-up: first-step allocations, AdamW state
        time_steps(models[name], optimizers[name], batch, 2)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            c, w = time_steps(models[name], optimizers[name], batch, args.steps)
            cpu[name].append(c)
            wall[name].append(w)

    base = statistics.median(cpu[UNET_PRESET])
    rows = []
    for name in names:
        median = statistics.median(cpu[name])
        rows.append(
            [name, f"{count_parameters(models[name]):,}", f"{1000 * median:.1f}",
             f"{1000 * statistics.median(wall[name]):.1f}", f"{median / base:.2f}"]
        )  # fmt: skip
    print(f"machine: {machine()}; git {git_revision()}; 1 thread; {vars(args)}")
    print_table(["model", "parameters", "CPU ms/step", "wall ms/step", f"vs {UNET_PRESET}"], rows)


if __name__ == "__main__":
    main()
