"""The DDPM pipeline an export ships (assembled with `diffusion/pipeline_code/`: torch and
diffusers only), and the noise level of a DDPM timestep that guidance reads.

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    images = pipe(class_labels=[3, 7], guidance_scale=1.5).images   # or class names: ["3", "7"]
    images = pipe(prompt=["a handwritten seven"], guidance_scale=2).images  # a text model

Any diffusers scheduler built from the export's config samples it (a `DDIMScheduler` for 50
steps); the toolkit's samplers (`samplers.py`) call the same guided output.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import ImagePipelineOutput, SchedulerMixin

from diffusion.pipeline_code.core import (
    ClassLabels,
    Generators,
    NetworkPipeline,
    Prompts,
    guidance_at,
    guided_output,
    network_output,
)


def ddpm_sigma(scheduler: SchedulerMixin, t: torch.Tensor | float | int) -> float:
    """The noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of timestep t of a diffusers
    scheduler, on the host (t is a CPU timestep: the samplers keep them there)."""
    return math.exp(float(_log_sigma(scheduler, torch.as_tensor(t, dtype=torch.float32))))


def _log_sigma(scheduler: SchedulerMixin, t: torch.Tensor) -> torch.Tensor:
    """ln sigma at (fractional) timestep t, linear in ln sigma between integer timesteps."""
    alphas_cumprod = scheduler.alphas_cumprod.to(t.device, torch.float32)
    log_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).log() / 2
    low = t.floor().long().clamp(0, len(alphas_cumprod) - 2)
    return torch.lerp(log_sigmas[low], log_sigmas[low + 1], t - low)


def ddpm_coefficients(
    scheduler: SchedulerMixin, t: torch.Tensor | float | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of a DDPM network at timestep t: x0 = c_skip x_t + c_out output.

    x_t is the variance-preserving input every diffusers scheduler feeds the network
    (`scale_model_input`), alpha_bar_t the training schedule's (`scheduler.alphas_cumprod`).
    A Karras-spaced sampler's fractional t is read as diffusers maps sigma to t: linearly in
    ln sigma between the integer timesteps, sigma^2 = (1 - alpha_bar) / alpha_bar.
    """
    log_sigma = _log_sigma(scheduler, torch.as_tensor(t, dtype=torch.float32))
    alpha_bar = torch.sigmoid(-2 * log_sigma)  # 1 / (1 + sigma^2)
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":  # x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
        return alpha_bar.rsqrt(), -log_sigma.exp()
    if prediction == "v_prediction":  # x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v
        return alpha_bar.sqrt(), -(1 - alpha_bar).sqrt()
    if prediction == "sample":
        return torch.zeros_like(t), torch.ones_like(t)
    raise ValueError(f"unknown prediction_type {prediction!r}")


class GuidedDDPMPipeline(NetworkPipeline):
    """A DDPM network and its noise schedule (any diffusers scheduler: swap in a
    `DDIMScheduler.from_config(pipe.scheduler.config)` for 50-step sampling); class-conditional
    or text-to-image with guidance when it was trained so."""

    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int = 1000,
        generator: Generators = None,
        eta: float = 0.0,
        guidance_interval: tuple[float, float] | str | None = None,
        batch_size: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt: Prompts | None = None,
        negative_prompt: Prompts | None = None,
        num_images_per_prompt: int = 1,
    ) -> ImagePipelineOutput | tuple:
        """One image per entry of `class_labels` (class ids or names), `num_images_per_prompt`
        per `prompt` of a text-to-image model (guided away from `negative_prompt`, default the
        empty prompt), or `batch_size` images of an unconditional model.

        `guidance_scale` and `guidance_interval` (noise levels (low, high] where w > 1 applies,
        "all": every step; `guidance_at`) default to the ones saved with the model.
        `generator`: a list of one generator per image makes each image independent of the
        batch it is drawn in. `eta` applies to DDIM. output_type: "pil", "np" (NHWC in [0, 1])
        or "pt" (NCHW in [0, 1]).
        """
        w, interval = self._guidance(guidance_scale, guidance_interval)
        condition, null, batch_size = self._conditions(
            class_labels, batch_size, generator, prompt, negative_prompt, num_images_per_prompt
        )
        net = self.network
        x = self._noise(batch_size, generator) * self.scheduler.init_noise_sigma
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        self.scheduler.set_timesteps(num_inference_steps)
        if hasattr(self.scheduler, "set_begin_index"):  # a repeated first timestep
            self.scheduler.set_begin_index(0)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            if condition is None:
                output = network_output(net, model_input, t)
            else:
                c_skip, c_out = ddpm_coefficients(self.scheduler, t)
                w_t = guidance_at(w, ddpm_sigma(self.scheduler, t), interval)
                output = guided_output(
                    net, model_input, t, condition, null, w_t, c_skip, c_out, self.data_range
                )
            x = self.scheduler.step(output.float(), t, x, **kwargs).prev_sample
        return self._images(x, output_type, return_dict)
