"""Correctness on the machine at hand, in every precision: the GPU half of what the tests check.

    python bench/gpu_checks.py --out /tmp/gpu_checks          # bench/gpu_suite.sh runs this
    python bench/gpu_checks.py --out /tmp/c --steps 20        # a quick CPU run of the same code

1. For fp32, bf16 and fp16: `train_ddpm.py` on the built-in digits (digits-small, batch 64)
   for --steps steps: the loss must fall and stay finite, no step may be skipped, and under
   fp16 the checkpoint must carry the GradScaler's state (CPU runs have none: fp16 is a no-op).
2. fp16 resume: the same command resumed from the half-way checkpoint must restore the scaler
   exactly (its state in the final checkpoint equals the uninterrupted run's) and end with the
   same weights; bit-identical where the kernels are deterministic, else the largest difference
   is printed.
Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_ddpm  # noqa: E402
from bench.common import git_revision, machine  # noqa: E402
from tests.tiny_runs import fresh_accelerate_state  # noqa: E402


def train(out: Path, precision: str, steps: int, resume: str = "none") -> list[dict]:
    fresh_accelerate_state()
    train_ddpm.main(
        [
            "--output-dir", str(out), "--max-steps", str(steps), "--mixed-precision", precision,
            "--log-every", str(max(1, steps // 4)), "--checkpoint-every", str(steps // 2),
            "--checkpoints-total-limit", "none", "--sample-every", "0",
            "--num-sample-images", "8", "--sample-steps", "5", "--report-to", "none",
            "--resume", resume,
        ]
    )  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check(name: str, ok: bool, detail: str, failures: list[str]) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_checks"))
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {machine()}; git {git_revision()}", flush=True)
    failures: list[str] = []
    shutil.rmtree(args.out, ignore_errors=True)

    for precision in ("no", "bf16", "fp16"):
        rows = train(args.out / precision, precision, args.steps)
        losses = [r["loss"] for r in rows if "loss" in r]
        finite = all(torch.isfinite(torch.tensor(losses)).tolist())
        skipped = rows[-1].get("nonfinite_steps", 0)
        check(
            f"{precision}: loss falls, finite, nothing skipped",
            finite and losses[-1] < losses[0] and skipped == 0,
            f"loss {[round(v, 4) for v in losses]}, skipped {skipped}",
            failures,
        )
        state = json.loads(
            (
                args.out / precision / "checkpoints" / f"checkpoint-{args.steps}" / "state.json"
            ).read_text()
        )
        scaler = state.get("grad_scaler")
        if precision == "fp16" and torch.cuda.is_available():
            check("fp16: GradScaler state saved", bool(scaler), f"{scaler}", failures)

    # fp16 resume from the half-way checkpoint.
    reference = args.out / "fp16" / "checkpoints"
    resumed = args.out / "fp16-resumed"
    half = f"checkpoint-{args.steps // 2}"
    shutil.copytree(reference / half, resumed / "checkpoints" / half)
    train(resumed, "fp16", args.steps, resume="latest")
    final = f"checkpoint-{args.steps}"
    states = [
        json.loads((d / final / "state.json").read_text())
        for d in (reference, resumed / "checkpoints")
    ]
    check(
        "fp16 resume: scaler state restored",
        states[0]["grad_scaler"] == states[1]["grad_scaler"],
        f"{states[0]['grad_scaler']} vs {states[1]['grad_scaler']}",
        failures,
    )
    a = load_file(reference / final / "model.safetensors")
    b = load_file(resumed / "checkpoints" / final / "model.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    check(
        "fp16 resume: same final weights",
        diff < 1e-3,
        "bit-identical" if diff == 0 else f"max |difference| {diff:.3g} (nondeterministic kernels)",
        failures,
    )
    if failures:
        print(f"{len(failures)} check(s) failed: {failures}")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
