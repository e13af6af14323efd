"""Prompt following of a text-to-image model of the captioned digits: for the training
phrasings and for the phrasings held out of training, N samples whose prompts name the ten
digits in turn, how often a classifier of the real digits reads the digit the prompt names, and
FID/KID against the first 1297 real digits.

    python bench/text_prompts_study.py runs/text-digits runs/text-digits/prompts
    python bench/text_prompts_study.py runs/text-digits OUT --guidance 1,1.5,3 --fid-guidance 1.5

Sample k draws prompt k mod P of a list ordered phrasing by phrasing, digit by digit (prompt
10 j + d is phrasing j of digit d), so with N a multiple of 10 every digit gets N / 10 samples.
Each (prompt set, w) is one `sample.py MODEL --prompts-file F --guidance-scale w --seed 1
--num-samples N` run in this process (with `--fid --dataset digits --max-reference 1297` at the
w of --fid-guidance), written to OUT/<set>-w<w>/; a folder that already holds the same
command's results is not sampled again.
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
from ddp_utils.data.source import (  # noqa: E402
    DIGIT_HELD_OUT_PHRASINGS,
    DIGIT_PHRASINGS,
    digit_captions,
)

SETS = {"trained": DIGIT_PHRASINGS, "held-out": DIGIT_HELD_OUT_PHRASINGS}


def prompts_of(phrasings: tuple[str, ...]) -> list[str]:
    """Prompt 10 j + d: phrasing j of digit d."""
    by_digit = [digit_captions(d, phrasings) for d in range(10)]
    return [by_digit[d][j] for j in range(len(phrasings)) for d in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="other flags go to sample.py"
    )
    parser.add_argument("model", help="a text-to-image run, checkpoint or export of the digits")
    parser.add_argument("out", type=Path)
    parser.add_argument("--guidance", default="1,1.5,3", help="comma list of w")
    parser.add_argument("--fid-guidance", type=float, default=1.5, help="w of the FID rows")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--max-reference", type=int, default=1297)
    args, sample_flags = parser.parse_known_args()
    revision = git_revision()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, phrasings in SETS.items():
        prompts = prompts_of(phrasings)
        prompts_file = args.out / f"{name}-prompts.txt"
        prompts_file.write_text("\n".join(prompts) + "\n")
        digits = np.array([p % 10 for p in range(len(prompts))])
        for w in [float(w) for w in args.guidance.split(",")]:
            folder = args.out / f"{name}-w{w:g}"
            fid = w == args.fid_guidance
            flags = [args.model, "--output-dir", str(folder), "--prompts-file", str(prompts_file),
                     "--guidance-scale", str(w), "--num-samples", str(args.num_samples),
                     "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                     *(["--fid", "--dataset", "digits", "--max-reference",
                        str(args.max_reference)] if fid else []), *sample_flags]  # fmt: skip
            cfg = parse_config(sample.SampleConfig, flags)
            if not done(folder, cfg, fid):
                sample.sample(cfg)
            with np.load(folder / "samples.npz") as npz:
                images, labels = npz["arr_0"], npz["labels"]
            read = digit_accuracy(images, digits[labels])
            metrics = json.loads((folder / "fid.json").read_text()) if fid else {}
            rows.append((name, len(prompts), w, read, metrics.get("fid"), metrics.get("kid_mean")))
    info = json.loads((folder / "sample_info.json").read_text())
    print(f"\n{args.model}: {info['scheduler']}, {info['num_steps']} steps; {args.num_samples} "
          f"samples (seed {args.seed}) per row, the ten digits in turn; FID/KID against the "
          f"first {args.max_reference} real digits"
          + (f"; sample.py flags: {' '.join(sample_flags)}" if sample_flags else ""))  # fmt: skip
    print(f"machine: {machine()}; commit {revision}\n")
    print("| phrasings | prompts | guidance w | read as the digit named | FID | KID x 1e3 |")
    print("|---|---|---|---|---|---|")
    for name, count, w, read, fid, kid in rows:
        scores = "| |" if fid is None else f"| {fid:.2f} | {1000 * kid:.2f} |"
        print(f"| {name} | {count} | {w:g} | {read:.1%} {scores}")


def done(folder: Path, cfg: sample.SampleConfig, fid: bool) -> bool:
    """Whether `folder` holds the results of exactly this sample.py configuration."""
    saved = folder / "sample_config.yaml"
    result = folder / ("fid.json" if fid else "samples.npz")
    return result.is_file() and saved.is_file() and saved.read_text() == to_yaml(cfg)


if __name__ == "__main__":
    main()
