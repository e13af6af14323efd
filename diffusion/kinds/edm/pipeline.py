"""The EDM pipeline an export ships (assembled with `diffusion/pipeline_code/`: torch and
diffusers only): the preconditioned denoiser around the network, and its noise levels.

EDM (Karras et al. 2022), in the paper's notation: y a clean image, sigma a noise level,
x = y + sigma n with n ~ N(0, I). The network F sees c_in(sigma) x and the noise label
c_noise(sigma); the denoiser (eq. 7) is D(x; sigma) = c_skip(sigma) x + c_out(sigma)
F(c_in(sigma) x; c_noise(sigma)). Sampling integrates the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max to 0 over the rho-spaced noise levels of
eq. 5 (Algorithm 2: Heun, optional churn; `samplers.sample_heun`). D is affine in F at a given
(x, sigma), so guidance on F is the same guidance on D.

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    images = pipe(num_inference_steps=18).images
"""

from __future__ import annotations

import torch
from diffusers import ImagePipelineOutput

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
from diffusion.pipeline_code.samplers import VARIANCE_EXPLODING, sample_heun


def preconditioning(
    sigma: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1, each shaped like `sigma`.

    c_in scales the input to unit variance, c_skip/c_out mix input and network output so that
    the network's training target has unit variance at every sigma, c_noise = ln(sigma) / 4.
    """
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = 1 / total.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def as_batch_column(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Noise levels as float32 (B, 1, 1, 1) on x's device: one per image, or one for all."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))


def denoise(
    net: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_data: float,
    condition: Condition | None = None,
    null: Condition | None = None,
    guidance_scale: float = 1.0,
    data_range: tuple[float, float] | None = VALUE_RANGE,
) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) in float32 (the network may autocast);
    with a `condition`, F is the output guided with scale w against `null` (`guided_output`;
    `data_range` None: a latent model's, not projected)."""
    sigma = as_batch_column(sigma, x)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    x = x.float()
    if condition is None:
        output = network_output(net, c_in * x, c_noise.flatten())
    else:
        # The network sees c_in x: D = (c_skip / c_in) (c_in x) + c_out F.
        output = guided_output(
            net, c_in * x, c_noise.flatten(), condition, null, guidance_scale,
            c_skip / c_in, c_out, data_range,
        )  # fmt: skip
    return c_skip * x + c_out * output.float()


def karras_sigmas(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0
) -> torch.Tensor:
    """The noise levels of eq. 5 and a final 0: num_steps + 1 values, float64, decreasing.

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho: rho = 7
    spends the steps where the trajectory bends most, at low noise.
    """
    if num_steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1; got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (high + ramp * (low - high)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class EDMPipeline(NetworkPipeline):
    """EDM sampling: the network as F and the EDM constants of the scheduler.

    The scheduler is diffusers' `EDMEulerScheduler`; its config holds sigma_min, sigma_max,
    sigma_data and rho (its own `step` is the first-order sampler with the same preconditioning).
    """

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        config = self.scheduler.config
        return karras_sigmas(num_inference_steps, config.sigma_min, config.sigma_max, config.rho)

    def denoiser(
        self,
        condition: Condition | None = None,
        null: Condition | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
    ) -> Denoiser:
        """The D(x, sigma) the sampler calls, guided when given a condition and w != 1."""
        sigma_data = self.scheduler.config.sigma_data
        return lambda x, sigma: denoise(
            self.network, x, sigma, sigma_data, condition, null,
            guidance_at(guidance_scale, float(sigma), guidance_interval), self.data_range,
        )  # fmt: skip

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generators = None,
        num_inference_steps: int = 18,
        class_labels: ClassLabels | None = None,
        guidance_scale: float | None = None,
        second_order: bool = True,
        churn: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_interval: tuple[float, float] | str | None = None,
        prompt: Prompts | None = None,
        negative_prompt: Prompts | None = None,
        num_images_per_prompt: int = 1,
    ) -> ImagePipelineOutput | tuple:
        """`num_inference_steps` noise levels: Heun makes 2N - 1 network evaluations (18 -> 35).

        `generator`: a list of one generator per image makes each image independent of the
        batch it is drawn in. `churn` > 0 samples stochastically (the paper's S_churn).
        A class-conditional model takes `class_labels` (ids or names; one image each, the batch
        size follows), a text-to-image model `prompt` (`num_images_per_prompt` images each)
        and `negative_prompt` (default: the empty prompt); both take `guidance_scale` and
        `guidance_interval` (noise levels (low, high] where w > 1 applies, "all": every step;
        default: the ones saved with the model).
        output_type: "pil", "np" (NHWC floats in [0, 1]) or "pt" (NCHW floats in [0, 1]).
        """
        condition, null, batch_size = self._conditions(
            class_labels, batch_size, generator, prompt, negative_prompt, num_images_per_prompt
        )
        w, interval = self._guidance(guidance_scale, guidance_interval)
        x, _ = sample_heun(
            self.denoiser(condition, null, w, interval),
            self._noise(batch_size, generator),
            self.sigmas(num_inference_steps),
            VARIANCE_EXPLODING,
            second_order=second_order,
            churn=churn,
            generator=generator,
        )
        return self._images(x, output_type, return_dict)
