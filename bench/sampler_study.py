"""FID of sampler variants on one trained DDPM: the README's "why do deterministic samplers
lose" table. Each variant changes one thing of a sampler (clipping, timestep spacing, the final
alpha, the Karras sigma_max, the weights) against the toolkit's own; the toolkit's samplers
themselves are rows of bench/fid_table.sh.

    python bench/sampler_study.py runs/ddpm/pipeline runs/ddpm/study        # every variant
    python bench/sampler_study.py runs/ddpm/pipeline runs/ddpm/study --only ddim-50 dpm-solver-20

Samples come from `diffusion.sampling.sample_ddpm` with sample.py's per-sample seeds, and FID/KID
from the same functions as `sample.py --fid --dataset digits --max-reference 1297`, so a variant
equal to a sample.py command (e.g. ddim-50) gives sample.py's number. Results are appended to
OUT/results.jsonl; variants already there are skipped (rerun after an interruption).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddp_utils.images import to_uint8  # noqa: E402
from diffusion.kinds.ddpm.samplers import SCHEDULE_KEYS, network_denoiser, sample_ddpm  # noqa: E402
from diffusion.loading import load_for_sampling  # noqa: E402
from diffusion.networks import sample_shape  # noqa: E402
from evaluation import compute_feature_stats, dataset_reference, fid_kid, load_fid_inception  # noqa: E402

KARRAS = {"use_karras_sigmas": True}


@dataclass
class Variant:
    label: str
    scheduler: type[SchedulerMixin]
    num_steps: int
    changes: dict[str, Any] = field(default_factory=dict)  # from_config overrides
    sigma_max: float | None = None  # a Karras spacing's start (None: the schedule's last t)
    eta: float = 0.0
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = "ema"
    model: str | None = None  # another checkpoint of the same run (relative to the run dir)

    def build(self, train_config: dict[str, Any]) -> SchedulerMixin:
        """The sampler with its own defaults and `changes`, on the training schedule."""
        schedule = {k: v for k, v in train_config.items() if k in SCHEDULE_KEYS}
        scheduler = self.scheduler.from_config(schedule, **self.changes)
        if self.sigma_max is not None:
            scheduler.register_to_config(sigma_max=self.sigma_max)
        if self.step_kwargs:
            scheduler.step = functools.partial(scheduler.step, **self.step_kwargs)
        return scheduler


VARIANTS = [
    Variant("ddim-50", DDIMScheduler, 50),
    Variant("ddim-50, clip_sample off", DDIMScheduler, 50, {"clip_sample": False}),
    Variant("ddim-50, eps from the clipped x0", DDIMScheduler, 50,
            step_kwargs={"use_clipped_model_output": True}),
    Variant("ddim-50, dynamic thresholding (Imagen, ratio 0.995)", DDIMScheduler, 50,
            {"thresholding": True, "sample_max_value": 1.0}),
    Variant("ddim-50, trailing spacing", DDIMScheduler, 50, {"timestep_spacing": "trailing"}),
    Variant("ddim-50, linspace spacing", DDIMScheduler, 50, {"timestep_spacing": "linspace"}),
    Variant("ddim-50, set_alpha_to_one off", DDIMScheduler, 50, {"set_alpha_to_one": False}),
    Variant("ddim-50, raw weights (no EMA)", DDIMScheduler, 50, weights="raw"),
    Variant("ddim-50, checkpoint-3500 (EMA, 500 steps less training)", DDIMScheduler, 50,
            model="checkpoints/checkpoint-3500"),
    Variant("dpm-solver-20, linspace spacing (diffusers' default: from t = 999)",
            DPMSolverMultistepScheduler, 20),
    Variant("dpm-solver-20, linspace, lambda_min_clipped -5.1", DPMSolverMultistepScheduler, 20,
            {"lambda_min_clipped": -5.1}),
    Variant("dpm-solver-2m-20, Karras from sigma 20291 (t = 999)", DPMSolverMultistepScheduler,
            20, KARRAS),
    Variant("euler-20, Karras from sigma 20291 (t = 999)", EulerDiscreteScheduler, 20, KARRAS),
    Variant("heun-10, Karras from sigma 20291 (t = 999)", HeunDiscreteScheduler, 10, KARRAS),
    Variant("unipc-20, linspace spacing (diffusers' default: from t = 999)",
            UniPCMultistepScheduler, 20),
    Variant("unipc-20, Karras from sigma 80", UniPCMultistepScheduler, 20, KARRAS, 80.0),
]  # fmt: skip


def count_calls(model: torch.nn.Module) -> list[int]:
    """A one-element list that counts the model's forward calls (network evaluations)."""
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", type=Path, help="a DDPM export (runs/ddpm/pipeline)")
    parser.add_argument("out", type=Path, help="folder for results.jsonl")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--only", nargs="*", help="labels (default: every variant)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {json.loads(line)["label"] for line in results.open()} if results.exists() else set()
    extractor = load_fid_inception("cpu")
    reference = dataset_reference("digits", 16, 1, max_images=1297, extractor=extractor).stats
    for variant in VARIANTS:
        if variant.label in done or (args.only and variant.label not in args.only):
            continue
        source = args.pipeline.parent / variant.model if variant.model else args.pipeline
        loaded = load_for_sampling(source, variant.weights)
        scheduler = variant.build(loaded.scheduler_config)
        calls = count_calls(loaded.model.eval())
        start = time.perf_counter()
        chunks = []
        try:
            for first in range(0, args.num_samples, args.batch_size):
                indices = range(first, min(args.num_samples, first + args.batch_size))
                x, _ = sample_ddpm(
                    network_denoiser(loaded.model), scheduler, sample_shape(loaded.model),
                    indices, args.seed, variant.num_steps, variant.eta,
                )  # fmt: skip
                chunks.append(torch.from_numpy(to_uint8(x, loaded.value_range)))
        except (IndexError, ValueError, RuntimeError) as err:  # diffusers failing is a result
            record = {"label": variant.label, "error": f"{type(err).__name__}: {err}"}
        else:
            images = torch.cat(chunks).permute(0, 3, 1, 2)
            metrics = fid_kid(compute_feature_stats(images, extractor), reference, seed=args.seed)
            record = {
                "label": variant.label,
                "evaluations": calls[0] // len(chunks),
                "fid": metrics["fid"],
                "kid_mean": metrics["kid_mean"],
                "seconds": time.perf_counter() - start,
            }
            slug = re.sub(r"[^a-z0-9]+", "-", variant.label.lower()).strip("-")
            np.savez(args.out / f"{slug}.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
        print(json.dumps(record), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done.add(variant.label)
    rows = {r["label"]: r for r in map(json.loads, results.open())}
    print("| variant | network evaluations | FID | KID x 1e3 |\n|---|---|---|---|")
    for variant in VARIANTS:
        if variant.label in rows:
            r = rows[variant.label]
            if "error" in r:
                print(f"| {r['label']} | | fails: {r['error'].splitlines()[0]} | |")
            else:
                fid, kid = f"{r['fid']:.2f}", f"{1000 * r['kid_mean']:.2f}"
                print(f"| {r['label']} | {r['evaluations']} | {fid} | {kid} |")


if __name__ == "__main__":
    main()
