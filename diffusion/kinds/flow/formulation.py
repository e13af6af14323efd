"""Rectified flow's training math and sampling from per-sample seeds.

Training (Esser et al. 2024, sec. 3): t from a distribution over (0, 1) (`sample_times`),
shifted by `time_shift`; x_t = (1 - t) x_0 + t n; the loss is ||v(x_t, 1000 t) - (n - x_0)||^2,
the conditional flow matching objective of the linear path (Lipman et al. 2023), unweighted.
The denoiser, the path and the pipeline are in `pipeline.py`, shipped with every export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddp_utils.compile import compile_function
from diffusion.kinds.flow.pipeline import LINEAR, flow_denoise, flow_levels, flow_sigma
from diffusion.networks import predict, unwrap
from diffusion.pipeline_code.core import Condition, Denoiser, guidance_at
from diffusion.pipeline_code.samplers import sample_with
from diffusion.sampling import make_sample_generators, model_autocast

VALUE_RANGE = (-1.0, 1.0)
NUM_TRAIN_TIMESTEPS = 1000  # the network's time input is 1000 t, as SD3's and diffusers'
TimeSampling = Literal["logit-normal", "uniform", "mode"]


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): the noise-to-signal ratio t / (1 - t) multiplied by s (s > 1:
    more time at high noise, what larger images need; SD3's resolution-dependent shift)."""
    if shift == 1:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_times(
    batch_size: int,
    distribution: TimeSampling,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Training times t in (0, 1), shape (B,), on the generator's device (Esser et al. 2024):
    logit-normal, t = sigmoid(m + s u) with u ~ N(0, 1) (their best, weighting the middle);
    uniform; or mode sampling, t = 1 - u - c (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)."""
    device = generator.device
    if distribution == "logit-normal":
        normal = torch.randn(batch_size, generator=generator, device=device)
        return torch.sigmoid(normal * logit_std + logit_mean)
    u = torch.rand(batch_size, generator=generator, device=device)
    if distribution == "uniform":
        return u
    if distribution == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    raise ValueError(f"unknown time sampling {distribution!r}")


def flow_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    condition: Condition | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, detached per-sample loss (B,)) of clean images x0 at times t (B,): the mean
    over pixels of (v(x_t, 1000 t) - (n - x0))^2 in float32 (the network may run in bf16).
    `model` may be wrapped (DDP, torch.compile): it is called as given."""
    column = t.float().reshape(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - column) * x0 + column * noise
    output = predict(model, x_t, (t * NUM_TRAIN_TIMESTEPS).float(), condition)
    per_sample = (output.float() - (noise - x0)).square().mean(dim=tuple(range(1, x0.ndim)))
    return per_sample.mean(), per_sample.detach()


def make_flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The export's scheduler: diffusers' flow-matching scheduler with the time shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)


def sampling_scheduler(
    scheduler_config: Mapping[str, Any], shift: float | None
) -> FlowMatchEulerDiscreteScheduler:
    """The export's scheduler, with another time shift when one is asked for."""
    changes = {} if shift is None else {"shift": shift}
    return FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config), **changes)


def flow_denoiser(
    net: torch.nn.Module,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    condition: Condition | None = None,
    null: Condition | None = None,
    guidance_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    data_range: tuple[float, float] | None = VALUE_RANGE,
    *,
    guidance_interval: tuple[float, float] | None = None,
    compile: tuple[str, str] | None = None,
) -> Denoiser:
    """D(x, t) around any backbone, guided with scale w against `null` when given a
    `condition` on the network's device, w > 1 only where t / (1 - t) is in
    `guidance_interval` (None: every step); only the network runs in `dtype` (autocast).
    `compile`: (backend, mode) to torch.compile D with, one graph per scale used."""
    device = next(unwrap(net).parameters()).device

    def step_denoiser(x: torch.Tensor, t: torch.Tensor, w: float) -> torch.Tensor:
        with model_autocast(device, dtype):
            return flow_denoise(net, x, t, num_train_timesteps, condition, null, w, data_range)

    if compile is not None:
        step_denoiser = compile_function(step_denoiser, *compile)

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = guidance_scale  # decided on the host from t: no device sync
        if condition is not None:
            w = guidance_at(guidance_scale, flow_sigma(float(t)), guidance_interval)
        return step_denoiser(x, t, w)

    return denoiser


@torch.no_grad()
def sample_flow(
    denoiser: Denoiser,
    scheduler: FlowMatchEulerDiscreteScheduler,
    shape: tuple[int, int, int],
    sample_indices: Sequence[int],
    seed: int,
    num_steps: int,
    method: str = "euler",
    churn: float = 0.0,
    eta: float = 1.0,
    device: torch.device | str = "cpu",
    progression_every: int | None = None,
    clamp: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Samples `sample_indices` of run `seed` over the scheduler's levels with sampler `method`
    (`samplers.METHODS`): the export's pipeline from the seeds of sample.py. Image k's
    initial noise and any fresh noise come from its own generator. Returns (images,
    progression): float32 NCHW on the CPU, in [-1, 1] unless `clamp` is False (latents)."""
    generators = make_sample_generators(seed, sample_indices)
    noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)
    levels = flow_levels(scheduler, num_steps, method)
    x, progression = sample_with(
        method, denoiser, noise, levels, LINEAR, churn=churn, eta=eta, generator=generators,
        progression_every=progression_every,
    )  # fmt: skip
    return (x.clamp(-1.0, 1.0) if clamp else x).cpu(), progression
