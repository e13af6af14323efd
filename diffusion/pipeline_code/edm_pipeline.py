"""EDM (Karras et al. 2022) denoiser and samplers, and the diffusers pipeline that runs them.

This one file is shipped as `pipeline.py` in every EDM export, so that

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)

samples the model with nothing but diffusers installed. The toolkit imports the same file for
training (`diffusion/edm.py`) and for `sample.py`: the export, the training grids and sample.py
share one denoiser and one sampler, and the same seeds give the same images. It may import only
torch and diffusers.

Notation of the paper: y a clean image, sigma a noise level, x = y + sigma * n with n ~ N(0, I).
The network F sees the scaled input c_in(sigma) x and the noise label c_noise(sigma); the
denoiser (eq. 7) is D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).
Sampling integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from
sigma_max to 0 over the rho-spaced noise levels of eq. 5 (Algorithm 2: Heun, optional churn).

Conditioning: `denoise` passes `class_labels` to the UNet (a `UNet2DModel` built with
`num_class_embeds`, the last embedding meaning "no class"). Classifier-free guidance (Ho &
Salimans 2022) combines the conditional and the unconditional network outputs,
F = F(x; null) + w (F(x; c) - F(x; null)), in one batched forward; since D is affine in F at
a given (x, sigma), this is the same guidance on D, and neither the sampler nor the
preconditioning changes. w = 1: the conditional model alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, sigma of shape (B,))
Generators = torch.Generator | list[torch.Generator] | None


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
    unet: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_data: float,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) in float32 (the network may autocast);
    with `class_labels` and a guidance scale w != 1, F is the guided output (module doc)."""
    sigma = as_batch_column(sigma, x)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    x = x.float()
    if class_labels is None:
        output = unet(c_in * x, c_noise.flatten(), return_dict=False)[0]
    elif guidance_scale == 1.0:
        output = unet(c_in * x, c_noise.flatten(), class_labels=class_labels, return_dict=False)[0]
    else:
        config = getattr(unet, "config", None) or unet.module.config
        null = torch.full_like(class_labels, int(config.num_class_embeds) - 1)
        both = unet(
            torch.cat([c_in * x] * 2),
            torch.cat([c_noise.flatten()] * 2),
            class_labels=torch.cat([class_labels, null]),
            return_dict=False,
        )[0].float()
        conditional, unconditional = both.chunk(2)
        output = unconditional + guidance_scale * (conditional - unconditional)
    return c_skip * x + c_out * output.float()


def as_class_labels(
    class_labels: int | str | list[int | str] | torch.Tensor, class_names: list[str] | None
) -> torch.Tensor:
    """Class ids (B,) from ids or class names."""
    if isinstance(class_labels, int | str):
        class_labels = [class_labels]
    if torch.is_tensor(class_labels):
        return class_labels.long()
    ids = []
    for label in class_labels:
        if isinstance(label, str):
            if not class_names or label not in class_names:
                raise ValueError(f"unknown class {label!r}; the classes are {class_names}")
            label = class_names.index(label)
        ids.append(int(label))
    return torch.tensor(ids, dtype=torch.long)


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


def edm_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    second_order: bool = True,
    churn: float = 0.0,
    churn_sigma_range: tuple[float, float] = (0.0, math.inf),
    churn_noise_scale: float = 1.0,
    generator: Generators = None,
    progression_every: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Algorithm 2 of the paper: x_0 from x_N = sigma_0 * noise over the levels `sigmas`.

    second_order: Heun's correction on every step but the last (2N - 1 network evaluations for
    N steps), else Euler (N). churn > 0 is the stochastic sampler: before step i the noise
    level is raised to sigma_hat = (1 + gamma) sigma_i, gamma = min(churn / N, sqrt(2) - 1),
    for sigma_i in `churn_sigma_range`, by adding fresh noise drawn from `generator` (a list:
    one generator per image). Returns (x_0, progression): CPU copies of x_i / sqrt(1 + sigma_i^2),
    the variance-preserving scale of DDPM's x_t, after every `progression_every`-th step.
    """
    num_steps = len(sigmas) - 1
    levels = [float(s) for s in sigmas]
    x = noise.float() * levels[0]
    progression: list[torch.Tensor] = []
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        # Churn: raise the noise level to sigma_hat with fresh noise (gamma = 0: deterministic).
        low, high = churn_sigma_range
        gamma = min(churn / num_steps, math.sqrt(2) - 1) if low <= sigma <= high else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            fresh = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * churn_noise_scale * fresh
        # Euler step along dx/dsigma = (x - D(x; sigma)) / sigma.
        slope = (x - denoiser(x, torch.tensor(sigma_hat))) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * slope
        # Heun: average the slopes at both ends (not at sigma = 0, where D is the answer).
        if second_order and sigma_next > 0:
            slope_next = (x_next - denoiser(x_next, torch.tensor(sigma_next))) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (slope + slope_next) / 2
        x = x_next
        if progression_every is not None and (i + 1) % progression_every == 0:
            progression.append((x / math.sqrt(1 + sigma_next**2)).cpu())
    return x, progression


class EDMPipeline(DiffusionPipeline):
    """Unconditional EDM sampling: a UNet2DModel as F and the EDM constants of the scheduler.

    The scheduler is diffusers' `EDMEulerScheduler`; its config holds sigma_min, sigma_max,
    sigma_data and rho (its own `step` is the first-order sampler with the same preconditioning).
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: EDMEulerScheduler,
        class_names: list[str] | None = None,
        guidance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # Saved in model_index.json: a class-conditional model's classes and chosen guidance.
        self.register_to_config(class_names=class_names, guidance_scale=guidance_scale)

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        config = self.scheduler.config
        return karras_sigmas(num_inference_steps, config.sigma_min, config.sigma_max, config.rho)

    def denoiser(
        self, class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0
    ) -> Denoiser:
        """The D(x, sigma) the sampler calls, guided when given classes and w != 1."""
        sigma_data = self.scheduler.config.sigma_data
        return lambda x, sigma: denoise(
            self.unet, x, sigma, sigma_data, class_labels, guidance_scale
        )

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generators = None,
        num_inference_steps: int = 18,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        second_order: bool = True,
        churn: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """`num_inference_steps` noise levels: Heun makes 2N - 1 network evaluations (18 -> 35).

        `generator`: a list of one generator per image makes each image independent of the
        batch it is drawn in. `churn` > 0 samples stochastically (the paper's S_churn).
        A class-conditional model takes `class_labels` (ids or names; one image each, the batch
        size follows) and `guidance_scale` (default: the one saved with the model).
        output_type: "pil", "np" (NHWC floats in [0, 1]) or "pt" (NCHW floats in [0, 1]).
        """
        labels = None
        if class_labels is not None:
            labels = as_class_labels(class_labels, self.config.class_names)
            batch_size = len(labels)
            labels = labels.to(self._execution_device)
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size}")
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        device = self._execution_device
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        x, _ = edm_sample(
            self.denoiser(labels, w),
            noise,
            self.sigmas(num_inference_steps),
            second_order=second_order,
            churn=churn,
            generator=generator,
        )
        image = (x.clamp(-1, 1) + 1) / 2  # the arithmetic of sample.py's uint8 conversion
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
