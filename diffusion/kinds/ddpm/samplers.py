"""DDPM's samplers: diffusers' schedulers (DDPM, DDIM, DPM-Solver, UniPC, Karras-spaced
Euler and Heun), built from the training schedule, stepping the network's guided output."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from ddp_utils.compile import compile_function
from diffusion.kinds.ddpm.pipeline import ddpm_coefficients, ddpm_sigma
from diffusion.kinds.registry import Knob, Sampler
from diffusion.networks import predict, unwrap
from diffusion.pipeline_code.core import VALUE_RANGE, Condition, guidance_at, guided_output
from diffusion.sampling import make_sample_generators, model_autocast

# DDIM's noise scale: on the default digits run DDIM-50 with eta 1 (fresh noise each step,
# like DDPM) matches DDPM-1000's FID where eta 0 does not (BENCHMARKS.md, "Quality per sampling
# step"); above 1 the step's noise would exceed the posterior's.
ETA = Knob(
    "eta",
    1.0,
    "the step's noise scale (0: deterministic; 1: DDPM-like, drawn from the posterior)",
    0.0,
    1.0,
)

# Samplers: a diffusers scheduler class and what changes from its own defaults. None may start
# at t = 999: the cosine schedule's capped last beta leaves alpha_bar_999 = 2.4e-9 there, so an
# epsilon model's x0 estimate is its error times 20,000 (DPM-Solver and UniPC with diffusers'
# default "linspace" spacing scored FID 400 on the epsilon digits run). "leading" spacing
# starts where DDIM does (t = 940 for 20 steps); Karras spacing starts at KARRAS_SIGMA_MAX.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, object]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm-solver": (DPMSolverMultistepScheduler, {"timestep_spacing": "leading"}),
    "dpm-solver-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpm-solver-3m-karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True, "solver_order": 3},
    ),
    "unipc": (UniPCMultistepScheduler, {"timestep_spacing": "leading"}),
    "euler-karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "heun-karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True}),
}
# Steps when none are given (Heun evaluates the network 2N - 1 times for N steps).
SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddpm", 1000, description="ancestral sampling, the paper's (slow reference)"),
        Sampler("ddim", 50, (ETA,), description="DDIM; eta 1 by default"),
        Sampler("dpm-solver", 20, description="DPM-Solver++(2M)"),
        Sampler("dpm-solver-2m-karras", 20),
        Sampler("dpm-solver-3m-karras", 20),
        Sampler("unipc", 20),
        Sampler("euler-karras", 20),
        Sampler("heun-karras", 10),
    )
}

# The highest noise level (VE sigma = sqrt((1 - alpha_bar) / alpha_bar)) a Karras-spaced
# sampler starts from: EDM's sigma_max. Without it the spacing starts at the schedule's last
# timestep, where the cosine schedule's capped beta puts sigma at ~20,000 (alpha_bar_999 =
# 2.4e-9): rho = 7 then spends half of 20 steps at t >= 998.
KARRAS_SIGMA_MAX = 80.0

# What a sampler inherits from the training scheduler: the noise schedule and what the network
# predicts. Its own knobs (timestep spacing, clipping, ...) stay the sampler's: a config read
# from disk lists every key, one in memory only those set by hand, and inheriting the knobs made
# the same sampler differ between the training grids and sample.py on the export. The steps'
# offset is the model's: a run whose export is a StableDiffusionPipeline samples with
# steps_offset 1, which that pipeline imposes on its scheduler (others keep diffusers' 0).
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
    "steps_offset",
)


def make_inference_scheduler(
    name: str, train_scheduler_config: dict, clip_sample: bool = True
) -> SchedulerMixin:
    """Build the DDPM sampler `name` from the training scheduler's config.

    The sampler takes the betas and prediction_type the model was trained with (a sampler with
    its own defaults would silently denoise with the wrong schedule), and its own defaults and
    `SCHEDULERS`' changes for everything else. `clip_sample` False: a latent model's sampler,
    whose clean-image estimate is a latent and must not be clipped to [-1, 1].
    """
    if name not in SCHEDULERS:
        raise ValueError(f"{name!r} is not a DDPM sampler; expected one of {list(SCHEDULERS)}")
    cls, changes = SCHEDULERS[name]
    if not clip_sample and "clip_sample" in inspect.signature(cls.__init__).parameters:
        changes = {**changes, "clip_sample": False}
    schedule = {k: v for k, v in train_scheduler_config.items() if k in SCHEDULE_KEYS}
    scheduler = cls.from_config(schedule, **changes)
    if changes.get("use_karras_sigmas"):
        # diffusers' Karras spacing reads `config.sigma_max` when the config has one (Euler and
        # UniPC take it as an argument; DPM-Solver and Heun only through the config).
        scheduler.register_to_config(sigma_max=KARRAS_SIGMA_MAX)
    return scheduler


def start_at_first_step(scheduler: SchedulerMixin) -> None:
    """Start the scheduler's steps at its first level. diffusers otherwise finds the first step
    by looking its timestep up, and takes the second match when the timestep repeats: DPM-Solver
    over Karras levels from sigma 80 rounds its first levels to the same timestep from 47 steps
    on (the cosine schedule's sigma climbs steeply near t = T), so it skipped a level and failed
    with an IndexError at the last step."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)


ModelOutput = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> the prediction


def network_denoiser(
    net: torch.nn.Module,
    condition: Condition | None = None,
    null: Condition | None = None,
    guidance_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    *,
    scheduler: SchedulerMixin | None = None,
    data_range: tuple[float, float] | None = VALUE_RANGE,
    guidance_interval: tuple[float, float] | None = None,
    compile: tuple[str, str] | None = None,
) -> ModelOutput:
    """What a DDPM sampler calls: (x_t, t) -> the network's prediction, any backbone.

    Only the network runs in `dtype` (autocast). A conditional network gets `condition`, on its
    device, and classifier-free guidance of scale w against `null` (the shipped pipeline's
    `guided_output`: the same numbers), which reads the noise level of each t from
    `scheduler`, the sampler that will call it (its training schedule and prediction type),
    and applies w > 1 only at noise levels in `guidance_interval` (`guidance_at`; None: every
    step). `data_range` None: a latent model's (guidance projects its estimate onto no range).
    `compile`: (backend, mode) to torch.compile the step's computation with: the network,
    guidance's batched pair and their combination, one graph per scale used.
    """
    guided = condition is not None and guidance_scale not in (0.0, 1.0)
    if guided and scheduler is None:
        raise ValueError("guidance (w not 0 or 1) needs the sampler's scheduler: its noise levels")
    device = next(unwrap(net).parameters()).device

    def step_output(x: torch.Tensor, t: torch.Tensor, w: float) -> torch.Tensor:
        with model_autocast(device, dtype):
            if condition is None:
                return predict(net, x, t)
            c_skip, c_out = ddpm_coefficients(scheduler, t) if guided else (1.0, 1.0)
            return guided_output(net, x, t, condition, null, w, c_skip, c_out, data_range)

    if compile is not None:
        step_output = compile_function(step_output, *compile)

    def output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The step's scale is decided on the host (t is a CPU timestep): no device sync.
        w = (
            guidance_at(guidance_scale, ddpm_sigma(scheduler, t), guidance_interval)
            if guided
            else guidance_scale
        )
        return step_output(x, t, w)

    return output


@torch.no_grad()
def sample_ddpm(
    model_output: ModelOutput,
    scheduler: SchedulerMixin,
    shape: tuple[int, int, int],
    sample_indices: Sequence[int],
    seed: int,
    num_inference_steps: int,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    progression_every: int | None = None,
    clamp: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate the samples `sample_indices` of run `seed` by reverse diffusion from x_T ~ N(0, I).

    `model_output(x_t, t)` is the network's prediction (`network_denoiser`: any backbone,
    guided or not) and `shape` (C, H, W) one sample's. Returns (images, progression): images
    are float32 NCHW on the CPU, clipped to [-1, 1]; progression holds CPU copies of x_t after
    every `progression_every`-th step (empty if None). `eta` is DDIM's noise scale (0:
    deterministic, 1: DDPM-like) and must stay 0 for the other samplers, which have no such knob.
    `clamp` False: latents, returned unclipped.
    """
    if num_inference_steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1; got {num_inference_steps}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    if eta != 0 and not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"eta applies only to DDIM; got eta={eta} for {type(scheduler).__name__}")
    if progression_every is not None and progression_every < 1:
        raise ValueError(f"progression_every must be >= 1 or None; got {progression_every}")
    generators = make_sample_generators(seed, sample_indices)
    # Only some samplers take noise (DDPM, DDIM with eta > 0, Euler with churn) or eta.
    accepted = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, object] = {"eta": eta} if "eta" in accepted else {}
    if "generator" in accepted:
        step_kwargs["generator"] = generators

    # Timesteps stay on the CPU: the scheduler indexes its CPU tables with them (no device sync)
    # and the networks copy the scalar to their device themselves.
    scheduler.set_timesteps(num_inference_steps)
    start_at_first_step(scheduler)
    # x_T ~ N(0, I), one generator per sample (init_noise_sigma is 1 for these samplers).
    x = torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)
    x = x * scheduler.init_noise_sigma
    progression: list[torch.Tensor] = []
    for i, t in enumerate(scheduler.timesteps):
        prediction = model_output(scheduler.scale_model_input(x, t), t)
        # Reverse step x_t -> x_{t-1}; a list of generators makes diffusers' randn_tensor draw
        # each sample's step noise from that sample's own stream.
        x = scheduler.step(prediction.float(), t, x, **step_kwargs).prev_sample
        if progression_every is not None and (i + 1) % progression_every == 0:
            progression.append(x.float().cpu())
    x = x.float()
    return (x.clamp(-1.0, 1.0) if clamp else x).cpu(), progression
