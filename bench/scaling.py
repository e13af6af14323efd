"""Data-parallel scaling on CPU: the same train_ddpm run on 1 process and on 2 (gloo).

    python bench/scaling.py                       # digits-small, 16x16, per-device batch 32

Both runs use the real launcher path; images/s is read from each run's metrics.jsonl (global
images over wall time of the last logging window). On a 2-core machine two processes compete
for the same cores as one process with two threads, so the figure measures DDP overhead more
than speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_revision, machine, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(num_processes: int, args, out: Path) -> float:
    train = [
        str(ROOT / "train_ddpm.py"), "--output-dir", str(out), "--resume", "none",
        "--preset", args.preset, "--resolution", str(args.resolution),
        "--batch-size", str(args.batch_size), "--max-steps", str(2 * args.steps),
        "--log-every", str(args.steps), "--checkpoint-every", str(10**9),
        "--sample-every", "0", "--num-sample-images", "1", "--sample-steps", "1",
        "--report-to", "none",
    ]  # fmt: skip
    env = dict(os.environ)
    if num_processes == 1:
        env["OMP_NUM_THREADS"] = str(args.threads)
        command = [sys.executable, *train]
    else:
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        command = [accelerate, "launch", "--config_file",
                   str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), *train]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in rows if "images_per_s" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits-small")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="per device")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="threads of the 1-process run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, Path(tmp) / "one")
        two = run(2, args, Path(tmp) / "two")
    print(f"\nmachine: {machine()}; git {git_revision()}; {time.strftime('%Y-%m-%d')}")
    print(f"preset {args.preset} at {args.resolution}px, per-device batch {args.batch_size}\n")
    print_table(
        ["processes", "global batch", "images/s", "vs 1 process"],
        [
            [f"1 ({args.threads} threads)", args.batch_size, f"{one:,.1f}", "1.00x"],
            ["2 (gloo, 1 thread each)", 2 * args.batch_size, f"{two:,.1f}", f"{two / one:.2f}x"],
        ],
    )


if __name__ == "__main__":
    main()
