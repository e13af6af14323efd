"""--gradient-checkpointing: what it saves in memory and costs in speed.

    python bench/grad_checkpointing.py                                   # CPU: unet-4.7m, 32x32
    python bench/grad_checkpointing.py --preset ddpm-cifar10 --batch-size 128 --mixed-precision bf16

Each setting trains `train_ddpm.py` in a fresh process (so peak memory is its own): images/s
of the last log window from metrics.jsonl, and peak memory: the GPU's allocator peak on CUDA,
else the process's peak resident set (which also counts Python, torch and the data).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_revision, machine, print_table  # noqa: E402

CHILD = """
import json, resource, sys, torch
sys.argv = ["train_ddpm.py", *sys.argv[1:]]
sys.path.insert(0, ".")
import train_ddpm
train_ddpm.main(sys.argv[1:])
peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print("PEAK", json.dumps(peak))
"""


def measure(args: argparse.Namespace, checkpointing: bool, out: Path) -> tuple[float, float]:
    import subprocess

    argv = [
        "--preset", args.preset, "--resolution", str(args.resolution), "--channels", "3",
        "--batch-size", str(args.batch_size), "--max-steps", str(2 * args.steps),
        "--log-every", str(args.steps), "--checkpoint-every", "100000", "--sample-every", "0",
        "--num-sample-images", "1", "--sample-steps", "1", "--report-to", "none",
        "--resume", "none", "--mixed-precision", args.mixed_precision, "--output-dir", str(out),
    ]  # fmt: skip
    if checkpointing:
        argv.append("--gradient-checkpointing")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    peak = json.loads(done.stdout.split("PEAK", 1)[1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_s"], peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="unet-4.7m")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="steps per log window")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for checkpointing in (False, True):
            rate, peak = measure(args, checkpointing, Path(tmp) / str(checkpointing))
            rows.append(["on" if checkpointing else "off", rate, peak])
    print(f"machine: {machine()}; git {git_revision()}; {vars(args)}")
    print_table(["gradient checkpointing", "images/s", "peak memory (MiB)"], rows)
    (off_rate, off_peak), (on_rate, on_peak) = ((r[1], r[2]) for r in rows)
    print(
        f"\ncheckpointing: {on_peak / off_peak:.2f}x the memory, {on_rate / off_rate:.2f}x the speed"
    )


if __name__ == "__main__":
    main()
