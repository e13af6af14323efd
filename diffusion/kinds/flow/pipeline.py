"""The rectified-flow pipeline an export ships (assembled with `diffusion/pipeline_code/`:
torch and diffusers only): the denoiser of a velocity network, the linear path, and
FlowPipeline, whose noise levels are its diffusers `FlowMatchEulerDiscreteScheduler`'s.

Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023; SD3, Esser et al. 2024):
x_t = (1 - t) x_0 + t n, n ~ N(0, I), t in [0, 1]; the network v(x_t, 1000 t) regresses the
velocity n - x_0, so the clean estimate is D(x_t, t) = x_t - t v. Sampling integrates
dx/dt = v = (x - D) / t from t = 1 (pure noise) to 0 over the scheduler's levels, shifted
toward high noise by `shift` (t' = s t / (1 + (s - 1) t)), with any sampler written over a
denoiser (`samplers.py`: Euler, Heun, DPM-Solver++(2M), ancestral).

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    images = pipe(num_inference_steps=50).images
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ImagePipelineOutput

from diffusion.pipeline_code.core import (
    VALUE_RANGE,
    ClassLabels,
    Condition,
    Denoiser,
    Generators,
    NetworkPipeline,
    Prompts,
    guidance_at,
    guided_output,
    network_output,
)
from diffusion.pipeline_code.samplers import NoisePath, sample_with

# The linear interpolant: x_t = (1 - t) x_0 + t n.
LINEAR = NoisePath(alpha=lambda t: 1.0 - t, sigma=lambda t: t)


def flow_sigma(t: float) -> float:
    """The noise-to-signal ratio t / (1 - t) of level t (what guidance's interval reads): x_t
    / (1 - t) = x_0 + sigma n. Infinite at t = 1."""
    return t / (1.0 - t) if t < 1 else float("inf")


def flow_denoise(
    net: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float,
    num_train_timesteps: int,
    condition: Condition | None = None,
    null: Condition | None = None,
    guidance_scale: float = 1.0,
    data_range: tuple[float, float] | None = VALUE_RANGE,
) -> torch.Tensor:
    """D(x_t, t) = x_t - t v(x_t, num_train_timesteps t) in float32 (the network may
    autocast); with a `condition`, v is the output guided with scale w against `null`
    (`guided_output`, c_skip 1, c_out -t; `data_range` None: a latent model's)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    column = t.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))
    x = x.float()
    timestep = (column * num_train_timesteps).flatten()
    if condition is None:
        velocity = network_output(net, x, timestep)
    else:
        velocity = guided_output(
            net, x, timestep, condition, null, guidance_scale, 1.0, -column, data_range
        )
    return x - column * velocity.float()


def flow_levels(
    scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, sampler: str = "euler"
) -> torch.Tensor:
    """The levels t_0 = 1 > ... > t_N = 0 of `num_steps` steps: the scheduler's own sigmas,
    which end at its smallest timestep 1/T before 0. Heun's levels are the scheduler's for
    N + 1 steps without that 1/T: its correction reads the velocity itself at the next level,
    and at t = 1/T the network has hardly been trained (logit-normal times put almost no
    mass there), where the other samplers read only x - t v with its error scaled by t (the
    learned digits model's Heun-10 scored FID 100 with a speckled background with that level,
    20.8 without)."""
    if sampler != "heun":
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.double()
    scheduler.set_timesteps(num_steps + 1, device="cpu")
    levels = scheduler.sigmas.double()
    return torch.cat([levels[:-2], levels[-1:]])


class FlowPipeline(NetworkPipeline):
    """A velocity network and its `FlowMatchEulerDiscreteScheduler` (num_train_timesteps, the
    time shift): class-conditional or text-to-image with guidance when it was trained so."""

    def denoiser(
        self,
        condition: Condition | None = None,
        null: Condition | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
    ) -> Denoiser:
        """The D(x, t) the sampler calls, guided when given a condition and w != 1."""
        steps = self.scheduler.config.num_train_timesteps
        return lambda x, t: flow_denoise(
            self.network, x, t, steps, condition, null,
            guidance_at(guidance_scale, flow_sigma(float(t)), guidance_interval), self.data_range,
        )  # fmt: skip

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generators = None,
        num_inference_steps: int = 50,
        class_labels: ClassLabels | None = None,
        guidance_scale: float | None = None,
        sampler: str = "euler",
        eta: float = 1.0,
        churn: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_interval: tuple[float, float] | str | None = None,
        prompt: Prompts | None = None,
        negative_prompt: Prompts | None = None,
        num_images_per_prompt: int = 1,
    ) -> ImagePipelineOutput | tuple:
        """`num_inference_steps` levels of the scheduler (set its shift with
        `pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
        shift=3.0)`). `sampler`: "euler" (N evaluations), "heun" (2N - 1), "dpm++2m" (N) or
        "euler-ancestral" (stochastic, noise scale `eta`); `churn` > 0 makes Euler and Heun
        stochastic. `generator`: a list of one generator per image makes each image
        independent of the batch it is drawn in. A class-conditional model takes
        `class_labels` (ids or names; one image each), a text-to-image model `prompt`
        (`num_images_per_prompt` images each) and `negative_prompt` (default: the empty
        prompt); both take `guidance_scale` and `guidance_interval` (noise levels (low, high]
        of t / (1 - t) where w > 1 applies, "all": every step; default: the ones saved with
        the model).
        output_type: "pil", "np" (NHWC floats in [0, 1]) or "pt" (NCHW floats in [0, 1]).
        """
        condition, null, batch_size = self._conditions(
            class_labels, batch_size, generator, prompt, negative_prompt, num_images_per_prompt
        )
        w, interval = self._guidance(guidance_scale, guidance_interval)
        x, _ = sample_with(
            sampler,
            self.denoiser(condition, null, w, interval),
            self._noise(batch_size, generator),
            flow_levels(self.scheduler, num_inference_steps, sampler),
            LINEAR,
            churn=churn,
            eta=eta,
            generator=generator,
        )
        return self._images(x, output_type, return_dict)
