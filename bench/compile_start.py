"""Start-up cost of --compile: the same compiled run twice, with an empty and then a warm cache.

    python bench/compile_start.py                                   # tiny UNet at 8x8, CPU
    python bench/compile_start.py --preset ddpm-cifar10 --resolution 32 --channels 3 \
        --batch-size 128 --mixed-precision bf16 --compile-mode reduce-overhead   # on a GPU

Each run is a fresh process (`python train_ddpm.py ... --compile`, 4 steps, a grid at the end)
with `DDP_DIFFUSION_CACHE` pointing at a new folder: the first compiles everything, the second
reads inductor's FX-graph and AOT-autograd caches from `<cache>/inductor`. Prints the wall time
of each whole run (imports, data, compile, steps, export).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import git_revision, machine, print_table  # noqa: E402
from tests.tiny_runs import TINY_UNET  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="a preset, or tiny (tests' UNet)")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--compile-mode", default="default")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    preset = args.preset
    if preset == "tiny":
        preset = str(work / "tiny_unet.json")
        Path(preset).write_text(json.dumps(TINY_UNET))
    env = {**os.environ, "DDP_DIFFUSION_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    rows = []
    for label in ("empty cache", "warm cache"):
        out = work / label.replace(" ", "-")
        command = [
            sys.executable, str(REPO / "train_ddpm.py"), "--preset", preset,
            "--resolution", str(args.resolution), "--channels", str(args.channels),
            "--batch-size", str(args.batch_size), "--max-steps", "4", "--log-every", "2",
            "--sample-every", "0", "--num-sample-images", "2", "--sample-steps", "2",
            "--report-to", "none", "--mixed-precision", args.mixed_precision,
            "--compile", "--compile-mode", args.compile_mode, "--output-dir", str(out),
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True)
        rows.append([label, f"{time.perf_counter() - start:.1f}"])
    print(f"machine: {machine()}; git {git_revision()}; {time.strftime('%Y-%m-%d')}")
    print(f"{vars(args)}\n")
    print_table(["run", "wall s (whole run, 4 steps + grid)"], rows)


if __name__ == "__main__":
    main()
