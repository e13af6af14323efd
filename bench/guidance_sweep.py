"""Classifier-free guidance sweep of a class-conditional digits model: for each guidance scale w,
N class-balanced samples (sample k has class k mod 10; the same seeds at every w), how often a
classifier of the real digits reads the asked class, and FID/KID against the first 1297 real
digits: the README's table "guidance w | read as the asked digit | FID | KID".

    python bench/guidance_sweep.py runs/cond/pipeline runs/cond/guidance
    python bench/guidance_sweep.py runs/cond-edm/pipeline runs/cond-edm/guidance --guidance 1,3
    # any sample.py flag is passed on, e.g. another sampler:
    python bench/guidance_sweep.py runs/cond/pipeline runs/cond/dpm --scheduler dpm-solver

Each w is one `sample.py MODEL --guidance-scale w --fid --dataset digits --max-reference 1297
--seed 1 --num-samples N` run in this process (the toolkit's own sampling and FID/KID, so a row
equals that command's fid.json), written to OUT/w<w>/ (samples.npz, grid.png, fid.json); a w
whose folder already holds the same command's results is not sampled again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sample  # noqa: E402
from bench.common import digit_accuracy, git_revision, machine  # noqa: E402
from ddp_utils.config import parse_config, to_yaml  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="other flags go to sample.py"
    )
    parser.add_argument("model", help="a class-conditional export, checkpoint or run directory")
    parser.add_argument("out", type=Path, help="one folder of samples and fid.json per w")
    parser.add_argument("--guidance", default="1,1.5,2,3,4,6", help="comma list of w")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--dataset", default="digits", help="FID reference (sample.py --dataset)")
    parser.add_argument("--max-reference", type=int, default=1297)
    args, sample_flags = parser.parse_known_args()
    revision = git_revision()  # the code this process imports now, whatever HEAD is later
    scales = [float(w) for w in args.guidance.split(",")]
    rows = []
    for w in scales:
        folder = args.out / f"w{w:g}"
        cfg = parse_config(sample.SampleConfig, [
            args.model, "--output-dir", str(folder), "--guidance-scale", str(w),
            "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--fid", "--dataset", args.dataset,
            "--max-reference", str(args.max_reference), *sample_flags,
        ])  # fmt: skip
        if not done(folder, cfg):
            sample.sample(cfg)
        with np.load(folder / "samples.npz") as npz:
            images, labels = npz["arr_0"], npz["labels"]
        metrics = json.loads((folder / "fid.json").read_text())
        info = json.loads((folder / "sample_info.json").read_text())
        # The classifier knows the 10 digits in gray only.
        read = digit_accuracy(images, labels) if images.shape[-1] == 1 else float("nan")
        rows.append((w, read, metrics["fid"], metrics["kid_mean"], info))
    first = rows[0][4]
    print(f"\n{args.model}: {first['scheduler']}, {first['num_steps']} steps"
          + (f", eta {first['eta']}" if first["eta"] is not None else "")
          + (f", churn {first['churn']}" if first["churn"] is not None else "")
          + f"; {args.num_samples} class-balanced samples (seed {args.seed}) per w, FID/KID "
          f"against the first {args.max_reference} images of {args.dataset}"
          + (f"; sample.py flags: {' '.join(sample_flags)}" if sample_flags else ""))  # fmt: skip
    print(f"machine: {machine()}; commit {revision}\n")
    print("| guidance w | read as the asked digit | FID | KID x 1e3 |\n|---|---|---|---|")
    for w, read, fid, kid, _ in rows:
        print(f"| {w:g} | {read:.1%} | {fid:.2f} | {1000 * kid:.2f} |")


def done(folder: Path, cfg: sample.SampleConfig) -> bool:
    """Whether `folder` holds the results of exactly this sample.py configuration."""
    saved = folder / "sample_config.yaml"
    return (folder / "fid.json").is_file() and saved.is_file() and saved.read_text() == to_yaml(cfg)


if __name__ == "__main__":
    main()
