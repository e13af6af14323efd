"""EDM training math (Karras et al. 2022, sec. 5), and EDM sampling from per-sample seeds.

The denoiser and its preconditioning live in `pipeline.py`, shipped in every EDM export, the
sampler in `diffusion/pipeline_code/samplers.py`; this module adds what only the toolkit needs:
the training loss and sampling from the seeds (seed, k) of `sample_seed`.

Training (Table 1, "Training"): ln(sigma) ~ N(P_mean, P_std^2), x = y + sigma n, and the loss
lambda(sigma) ||D(x; sigma) - y||^2 with lambda(sigma) = (sigma^2 + sigma_data^2) /
(sigma sigma_data)^2. Since D = c_skip x + c_out F and lambda c_out^2 = 1, that loss equals
||F(c_in x; c_noise) - (y - c_skip x) / c_out||^2 (eq. 8): the network regresses a unit-variance
target at every noise level, which is how it is computed here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import EDMEulerScheduler

from ddp_utils.compile import compile_function
from diffusion.kinds.edm.pipeline import denoise, karras_sigmas, preconditioning
from diffusion.networks import predict, unwrap
from diffusion.pipeline_code.core import Condition, Denoiser, guidance_at
from diffusion.pipeline_code.samplers import VARIANCE_EXPLODING, sample_with
from diffusion.sampling import make_sample_generators, model_autocast

VALUE_RANGE = (-1.0, 1.0)  # the paper's CIFAR-10 range; sigma_data = 0.5 assumes it


def make_edm_scheduler(
    sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> EDMEulerScheduler:
    """The export's scheduler: its config carries the EDM constants the sampler needs."""
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0; got {sigma_data}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    return EDMEulerScheduler(
        sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho
    )


def sample_noise_levels(
    batch_size: int, p_mean: float, p_std: float, generator: torch.Generator
) -> torch.Tensor:
    """sigma with ln(sigma) ~ N(p_mean, p_std^2), shape (B,), on the generator's device."""
    normal = torch.randn(batch_size, generator=generator, device=generator.device)
    return (normal * p_std + p_mean).exp()


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out(sigma)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(
    model: torch.nn.Module,
    y: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    sigma_data: float,
    condition: Condition | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, detached per-sample loss (B,)) of clean images y at noise levels sigma (B,).

    Per sample: the mean over pixels of lambda(sigma) (D(y + sigma n; sigma) - y)^2, computed
    as (F - (y - c_skip x) / c_out)^2 in float32 (the network may run in bf16). `model` may be
    wrapped (DDP, torch.compile): it is called as given, so gradients synchronise.
    """
    column = sigma.float().reshape(-1, *([1] * (y.ndim - 1)))
    c_skip, c_out, c_in, c_noise = preconditioning(column, sigma_data)
    x = y + column * noise
    output = predict(model, c_in * x, c_noise.flatten(), condition)
    target = (y - c_skip * x) / c_out
    per_sample = (output.float() - target).square().mean(dim=tuple(range(1, y.ndim)))
    return per_sample.mean(), per_sample.detach()


def edm_denoiser(
    net: torch.nn.Module,
    sigma_data: float,
    condition: Condition | None = None,
    null: Condition | None = None,
    guidance_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    data_range: tuple[float, float] | None = VALUE_RANGE,
    *,
    guidance_interval: tuple[float, float] | None = None,
    compile: tuple[str, str] | None = None,
) -> Denoiser:
    """D(x, sigma) around any backbone, guided with scale w against `null` when given a
    `condition` on the network's device, w > 1 only for sigma in `guidance_interval` (`guidance_at`; None:
    every step); only the network runs in `dtype` (autocast). `data_range` None: a latent
    model's (guidance projects nothing). `compile`: (backend, mode) to torch.compile D with
    (preconditioning, network and guidance: one graph per scale used)."""
    device = next(unwrap(net).parameters()).device

    def step_denoiser(x: torch.Tensor, sigma: torch.Tensor, w: float) -> torch.Tensor:
        with model_autocast(device, dtype):
            return denoise(net, x, sigma, sigma_data, condition, null, w, data_range)

    if compile is not None:
        step_denoiser = compile_function(step_denoiser, *compile)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        # The sampler's noise levels are host numbers: the step's scale costs no device sync.
        w = guidance_scale
        if condition is not None:
            w = guidance_at(guidance_scale, float(sigma), guidance_interval)
        return step_denoiser(x, sigma, w)

    return denoiser


@torch.no_grad()
def sample_edm(
    denoiser: Denoiser,
    scheduler_config: Mapping[str, Any],
    shape: tuple[int, int, int],
    sample_indices: Sequence[int],
    seed: int,
    num_steps: int,
    method: str = "heun",
    churn: float = 0.0,
    eta: float = 1.0,
    device: torch.device | str = "cpu",
    progression_every: int | None = None,
    clamp: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Samples `sample_indices` of run `seed`: the export's sampler from the seeds of sample.py.

    `denoiser` is D(x, sigma) (`edm_denoiser`: any backbone, guided or not), `shape` (C, H, W)
    one sample's, `method` a sampler of `samplers.METHODS` over the rho-spaced noise levels of
    the scheduler config. Returns (images, progression): float32 NCHW on the CPU in [-1, 1].
    Image k's initial noise and any fresh noise come from its own generator, as in the pipeline
    when it is given the same list of generators. `clamp` False: latents, unclipped.
    """
    if churn < 0:
        raise ValueError(f"churn must be >= 0; got {churn}")
    generators = make_sample_generators(seed, sample_indices)
    noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)
    sigmas = karras_sigmas(
        num_steps,
        float(scheduler_config["sigma_min"]),
        float(scheduler_config["sigma_max"]),
        float(scheduler_config["rho"]),
    )
    x, progression = sample_with(
        method, denoiser, noise, sigmas, VARIANCE_EXPLODING, churn=churn, eta=eta,
        generator=generators, progression_every=progression_every,
    )  # fmt: skip
    return (x.clamp(-1.0, 1.0) if clamp else x).cpu(), progression
