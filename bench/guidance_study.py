"""Why strong guidance failed on the default conditional digits run: the README's table of
candidate fixes. Each variant changes one thing of classifier-free guidance as it was
(out = uncond + w (cond - uncond), handed to the sampler as it is) and reports how often a
classifier of the real digits reads the asked class (and with --fid, FID/KID against the first
1297 real digits) in N class-balanced samples from sample.py's seeds.

    python bench/guidance_study.py runs/cond/pipeline runs/cond/study --w 3 6
    python bench/guidance_study.py runs/cond/pipeline runs/cond/study --only plain "clip_sample off" --fid
    python bench/guidance_study.py runs/cond-edm/pipeline runs/cond-edm/study   # EDM: the guide rows

DDPM models sample with DDIM-50, eta 1 (the default); EDM models with Heun-18. Variants are a
sampler change (a DDIM knob) or a `model_output(x_t, t)` / EDM denoiser written here around
the network; "projected (the fix)" is the toolkit's own guidance (`pipelines.guide`), the
sampler sample.py runs. Results are appended to OUT/results.jsonl; rows already there are
skipped (rerun after an interruption).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import digit_accuracy, git_revision, machine  # noqa: E402
from ddp_utils.images import to_uint8  # noqa: E402
from diffusion.kinds.ddpm.pipeline import ddpm_coefficients  # noqa: E402
from diffusion.kinds.ddpm.samplers import make_inference_scheduler, sample_ddpm  # noqa: E402
from diffusion.kinds.edm.formulation import sample_edm  # noqa: E402
from diffusion.kinds.edm.pipeline import preconditioning  # noqa: E402
from diffusion.loading import load_for_sampling  # noqa: E402
from diffusion.networks import sample_shape  # noqa: E402
from diffusion.pipeline_code.core import class_condition, guide, network_output, null_class  # noqa: E402
from evaluation import compute_feature_stats, dataset_reference, fid_kid, load_fid_inception  # noqa: E402

# A combination: (cond, uncond, w, x, c_skip, c_out, sigma) -> the output the sampler gets, where
# D = c_skip x + c_out output is the clean image it stands for and sigma the step's noise level.
Combine = Callable[..., torch.Tensor]
T = torch.Tensor


def plain(cond: T, uncond: T, w: float, x: T, c_skip: T, c_out: T, sigma: T) -> T:
    return uncond + w * (cond - uncond)


def on_the_clean_image(cond: T, uncond: T, w: float, x: T, c_skip: T, c_out: T, sigma: T) -> T:
    """Guide D instead of v or eps: the same numbers, since D is affine in the output."""
    d_cond, d_uncond = c_skip * x + c_out * cond, c_skip * x + c_out * uncond
    return (d_uncond + w * (d_cond - d_uncond) - c_skip * x) / c_out


def rescaled(phi: float, clean_image: bool) -> Combine:
    """CFG rescale (Lin et al. 2023, sec. 3.4): the guided output's std per image scaled to
    the conditional one's, mixed phi : 1 - phi with the guided output; on the output (as
    diffusers' `guidance_rescale`) or on D."""

    def combine(cond: T, uncond: T, w: float, x: T, c_skip: T, c_out: T, sigma: T) -> T:
        if clean_image:
            cond, uncond = c_skip * x + c_out * cond, c_skip * x + c_out * uncond
        guided = uncond + w * (cond - uncond)
        dims = tuple(range(1, guided.ndim))
        ratio = cond.std(dims, keepdim=True) / guided.std(dims, keepdim=True)
        out = phi * guided * ratio + (1 - phi) * guided
        return (out - c_skip * x) / c_out if clean_image else out

    return combine


def interval(low: float, high: float) -> Combine:
    """Guidance only for noise levels low < sigma <= high (Kynkaanniemi et al. 2024), the
    conditional output elsewhere."""

    def combine(cond: T, uncond: T, w: float, x: T, c_skip: T, c_out: T, sigma: T) -> T:
        return uncond + w * (cond - uncond) if low < float(sigma) <= high else cond

    return combine


def projected(cond: T, uncond: T, w: float, x: T, c_skip: T, c_out: T, sigma: T) -> T:
    return guide(cond, uncond, w, x, c_skip, c_out)


def projected_interval(low: float, high: float) -> Combine:
    """The projection, inside a guidance interval: the conditional output outside it."""

    def combine(cond: T, uncond: T, w: float, x: T, c_skip: T, c_out: T, sigma: T) -> T:
        return guide(cond, uncond, w, x, c_skip, c_out) if low < float(sigma) <= high else cond

    return combine


@dataclass
class Variant:
    label: str
    combine: Combine = plain
    ddim_changes: dict[str, Any] = field(default_factory=dict)  # from_config overrides
    ddim_step: dict[str, Any] = field(default_factory=dict)  # step() keyword arguments
    edm: bool = True  # also a row for EDM models (no DDIM knob)


VARIANTS = [
    Variant("plain (as it was)"),
    Variant("clip_sample off", ddim_changes={"clip_sample": False}, edm=False),
    Variant("noise from the clipped x0 (use_clipped_model_output)",
            ddim_step={"use_clipped_model_output": True}, edm=False),
    Variant("dynamic thresholding (Imagen; diffusers' DDIM, p 0.995)",
            ddim_changes={"thresholding": True, "sample_max_value": float("inf")}, edm=False),
    Variant("guidance interval sigma in (0.28, 5.42]", interval(0.28, 5.42)),
    Variant("CFG rescale 0.7 on the output", rescaled(0.7, clean_image=False)),
    Variant("CFG rescale 0.7 on x0", rescaled(0.7, clean_image=True)),
    Variant("guiding x0 instead of v / eps", on_the_clean_image),
    Variant("projected (the fix)", projected),
    Variant("projected, interval sigma in (0.28, 5.42]", projected_interval(0.28, 5.42)),
    Variant("projected, interval sigma in (0, 5.42]", projected_interval(0, 5.42)),
    Variant("projected, interval sigma in (0.28, 2]", projected_interval(0.28, 2)),
    Variant("projected, interval sigma in (0, 1]", projected_interval(0, 1)),
]  # fmt: skip


def ddpm_draw(loaded: Any, variant: Variant, w: float, seed: int) -> Callable:
    scheduler = make_inference_scheduler("ddim", loaded.scheduler_config)
    if variant.ddim_changes:
        scheduler = type(scheduler).from_config(scheduler.config, **variant.ddim_changes)
    if variant.ddim_step:
        step = scheduler.step
        scheduler.step = lambda *args, **kwargs: step(*args, **kwargs, **variant.ddim_step)
    net = loaded.model

    def draw(indices: range, labels: torch.Tensor) -> torch.Tensor:
        def model_output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            null = torch.full_like(labels, null_class(net))
            cond, uncond = network_output(net, torch.cat([x, x]), t,
                                          class_condition(torch.cat([labels, null]))).chunk(2)  # fmt: skip
            c_skip, c_out = ddpm_coefficients(scheduler, t)
            alpha_bar = scheduler.alphas_cumprod[int(t)]  # DDIM's timesteps are integers
            sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
            return variant.combine(cond, uncond, w, x, c_skip, c_out, sigma)

        return sample_ddpm(model_output, scheduler, sample_shape(net), indices, seed, 50, 1.0)[0]

    return draw


def edm_draw(loaded: Any, variant: Variant, w: float, seed: int) -> Callable:
    net, config = loaded.model, loaded.scheduler_config
    sigma_data = float(config["sigma_data"])

    def draw(indices: range, labels: torch.Tensor) -> torch.Tensor:
        def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            c_skip, c_out, c_in, c_noise = preconditioning(sigma.float(), sigma_data)
            null = torch.full_like(labels, null_class(net))
            cond, uncond = network_output(net, torch.cat([c_in * x] * 2),
                                          c_noise.expand(2 * len(x)),
                                          class_condition(torch.cat([labels, null]))).chunk(2)  # fmt: skip
            output = variant.combine(cond, uncond, w, c_in * x, c_skip / c_in, c_out, sigma)
            return c_skip * x + c_out * output

        return sample_edm(denoiser, config, sample_shape(net), indices, seed, 18)[0]

    return draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a class-conditional digits export")
    parser.add_argument("out", type=Path, help="folder for results.jsonl and the samples")
    parser.add_argument("--w", type=float, nargs="+", default=[3.0, 6.0])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--only", nargs="*", help="labels (default: every variant)")
    parser.add_argument("--fid", action="store_true", help="also FID/KID (minutes per row)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = (
        {(r["label"], r["w"]) for r in map(json.loads, results.open())}
        if results.exists()
        else set()
    )
    loaded = load_for_sampling(args.model)
    loaded.model.eval()
    edm = loaded.task == "edm"
    extractor = reference = None
    if args.fid:
        extractor = load_fid_inception("cpu")
        reference = dataset_reference("digits", 16, 1, max_images=1297, extractor=extractor).stats
    variants = [
        v for v in VARIANTS if (v.edm or not edm) and (not args.only or v.label in args.only)
    ]
    for variant in variants:
        for w in args.w:
            if (variant.label, w) in done:
                continue
            draw = (edm_draw if edm else ddpm_draw)(loaded, variant, w, args.seed)
            chunks = []
            with torch.no_grad():
                for first in range(0, args.num_samples, args.batch_size):
                    indices = range(first, min(args.num_samples, first + args.batch_size))
                    labels = torch.tensor([k % 10 for k in indices])
                    chunks.append(
                        torch.from_numpy(to_uint8(draw(indices, labels), loaded.value_range))
                    )
            images = torch.cat(chunks).numpy()
            asked = np.array([k % 10 for k in range(args.num_samples)])
            record = {"label": variant.label, "w": w, "read": digit_accuracy(images, asked)}
            if extractor is not None:
                stats = compute_feature_stats(
                    torch.from_numpy(images).permute(0, 3, 1, 2), extractor
                )
                metrics = fid_kid(stats, reference, seed=args.seed)
                record.update(fid=metrics["fid"], kid_mean=metrics["kid_mean"])
            slug = re.sub(r"[^a-z0-9.]+", "-", variant.label.lower()).strip("-")
            np.savez(args.out / f"{slug}-w{w:g}.npz", arr_0=images)
            print(json.dumps(record), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
    rows = {(r["label"], r["w"]): r for r in map(json.loads, results.open())}
    print(f"\n{args.model} ({'EDM Heun-18' if edm else 'DDIM-50, eta 1'}), {args.num_samples} "
          f"samples per cell, seed {args.seed}; machine: {machine()}; commit {git_revision()}\n")  # fmt: skip
    header = " | ".join(f"w = {w:g}" for w in args.w)
    print(f"| variant | {header} |\n|---|" + "---|" * len(args.w))
    for variant in variants:
        cells = []
        for w in args.w:
            r = rows.get((variant.label, w))
            cell = "" if r is None else f"{r['read']:.1%}"
            if r is not None and "fid" in r:
                cell += f", FID {r['fid']:.2f}"
            cells.append(cell)
        print(f"| {variant.label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
