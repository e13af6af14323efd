"""Where the toolkit's training step spends its time: torch.profiler over steady-state steps.

    python bench/profile_step.py --preset ddpm-cifar10 --batch-size 128 --mixed-precision bf16

Runs the real `train_ddpm.train` with the profiler recording only steps 10..19 (after
warm-up), then prints the top operators by device time (CPU time on a CPU) and the share of
the step the device was busy: a GPU idle between kernels points at launch overhead or host work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_ddpm  # noqa: E402
from bench.common import git_revision, machine  # noqa: E402
from ddp_utils import loop  # noqa: E402
from tests.tiny_runs import fresh_accelerate_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits-small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=10, active=10, repeat=1))
    real_step = loop.optimizer_step

    def profiled_step(*a, **k):
        out = real_step(*a, **k)
        prof.step()
        return out

    loop.optimizer_step = profiled_step
    with tempfile.TemporaryDirectory() as tmp, prof:
        fresh_accelerate_state()
        train_ddpm.main(
            [
                "--preset", args.preset, "--batch-size", str(args.batch_size),
                "--resolution", str(args.resolution), "--channels", "3",
                "--mixed-precision", args.mixed_precision, "--max-steps", "21",
                "--log-every", "21", "--checkpoint-every", "1000", "--sample-every", "0",
                "--num-sample-images", "1", "--sample-steps", "1", "--report-to", "none",
                "--resume", "none", "--output-dir", tmp,
            ]
        )  # fmt: skip
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"machine: {machine()}; git {git_revision()}; {args}")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    if cuda:
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events)
        wall_us = max(e.time_range.end for e in prof.events()) - min(
            e.time_range.start for e in prof.events()
        )
        print(f"device busy {device_us / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms profiled (10 steps)")


if __name__ == "__main__":
    main()
