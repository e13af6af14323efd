"""The diffusers pipelines of this toolkit's exports, and the network call every sampler shares.

This one file is shipped as `pipeline.py` in every export that needs code of its own (EDM,
class-conditional DDPM, a DiT), so that

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    images = pipe(class_labels=[3, 7], guidance_scale=1.5).images   # or class names: ["3", "7"]

runs the model with nothing but diffusers installed. The toolkit imports the same file for the
training grids and `sample.py`, so the three agree image for image. It may import only torch
and diffusers.

A latent model's pipeline also holds a `vae` (an AutoencoderKL): the network denoises its
latents, scaled by the `scaling_factor` of the VAE's config, and `decode_latents` turns them
into images (the toolkit's sampling decodes with the same function).

The network (a `UNet2DModel` or a `DiTTransformer2DModel`) is called through one signature,
`network_output(net, x, t, class_labels)`: the sample shape, the "no class" index and how each
takes its time and class inputs are read from the network here and nowhere else.

Classifier-free guidance (Ho & Salimans 2022): the network learned both p(x | c) and, with
labels replaced by a "no class" index during training, p(x). Sampling combines the two outputs,
out = out(x, null) + w (out(x, c) - out(x, null)), in one batched forward. w = 1 is the plain
conditional model, w = 0 the unconditional one, w > 1 trades variety for class likeness. For
w > 1 that is an extrapolation, and the clean image it stands for, D = c_skip x + c_out out,
leaves the data range at high noise; `guide` returns the output whose D is projected back onto
[-1, 1], so that every sampler steps toward an image in range (`guide` says why).

EDM (Karras et al. 2022), in the paper's notation: y a clean image, sigma a noise level,
x = y + sigma n with n ~ N(0, I). The network F sees c_in(sigma) x and the noise label
c_noise(sigma); the denoiser (eq. 7) is D(x; sigma) = c_skip(sigma) x + c_out(sigma)
F(c_in(sigma) x; c_noise(sigma)). Sampling integrates the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max to 0 over the rho-spaced noise levels of
eq. 5 (Algorithm 2: Heun, optional churn). D is affine in F at a given (x, sigma), so guidance
on F is the same guidance on D.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DiTTransformer2DModel,
    ImagePipelineOutput,
    SchedulerMixin,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, sigma of shape (B,))
Generators = torch.Generator | list[torch.Generator] | None
ClassLabels = int | str | list[int | str] | torch.Tensor

# ---------------------------------------------------------------------------------------------
# The network call
# ---------------------------------------------------------------------------------------------


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(net, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


def sample_shape(net: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of what the network denoises, from its config."""
    config = unwrap(net).config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    return int(config.in_channels), int(height), int(width)


def null_class(net: torch.nn.Module) -> int:
    """The "no class" index guidance uses: a UNet's last class embedding; a DiT's label table
    has one row past its classes (as diffusers' DiTPipeline's class_null = 1000)."""
    model = unwrap(net)
    if isinstance(model, DiTTransformer2DModel):
        return int(model.config.num_embeds_ada_norm)
    return int(model.config.num_class_embeds) - 1


def network_output(
    net: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float | int,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The network's prediction for x (B, C, H, W) at time/noise input t, shaped like x.

    `net` may be wrapped (DDP, torch.compile): it is called as given, so gradients synchronise.
    A UNet2DModel takes t as a scalar or (B,) and `class_labels` through its class embedding.
    A DiT needs t as (B,) and always a label: an unconditional one is built with one class,
    0; a DiT with a learned-variance head (2C output channels) gives its first C.
    """
    model = unwrap(net)
    if isinstance(model, DiTTransformer2DModel):
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if class_labels is None:
            class_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        output = net(x, timestep=t, class_labels=class_labels, return_dict=False)[0]
        return output[:, : x.shape[1]]
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    return net(x, t, return_dict=False, **kwargs)[0]


def guided_output(
    net: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float | int,
    class_labels: torch.Tensor,
    guidance_scale: float,
    null_label: int,
    c_skip: torch.Tensor | float,
    c_out: torch.Tensor | float,
    data_range: tuple[float, float] | None = (-1.0, 1.0),
) -> torch.Tensor:
    """The network's output for classes `class_labels` (B,), guided with scale w (`guide`).

    (c_skip, c_out): the clean image this output stands for at this step is D = c_skip x +
    c_out output (`ddpm_coefficients` for a DDPM sampler, EDM's preconditioning for EDM).
    w = 1 and w = 0 need one forward pass (the conditional or the "no class" one) and return
    the network's output unchanged; any other w runs both in one batched forward of [x, x]
    with [labels, null]: at most 2x the cost of an unguided step, in one kernel launch per layer.
    """
    if guidance_scale in (0.0, 1.0):
        if guidance_scale == 0.0:
            class_labels = torch.full_like(class_labels, null_label)
        return network_output(net, x, t, class_labels)
    if torch.is_tensor(t) and t.ndim > 0:
        t = torch.cat([t, t])
    labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
    both = network_output(net, torch.cat([x, x]), t, labels)
    conditional, unconditional = both.chunk(2)
    return guide(conditional, unconditional, guidance_scale, x, c_skip, c_out, data_range)


VALUE_RANGE = (-1.0, 1.0)  # the images of every model here (and the samplers' final clamp)


def guide(
    conditional: torch.Tensor,
    unconditional: torch.Tensor,
    guidance_scale: float,
    x: torch.Tensor,
    c_skip: torch.Tensor | float,
    c_out: torch.Tensor | float,
    data_range: tuple[float, float] | None = VALUE_RANGE,
) -> torch.Tensor:
    """Classifier-free guidance of two network outputs at x, its clean image kept in range.

    The guided output g = uncond + w (cond - uncond) stands for the clean image
    D = c_skip x + c_out g: the same extrapolation of the two models' D. For w > 1 it leaves
    [-1, 1], where E[x0 | x] never is, most at high noise (on the digits at w = 3, 45% of D's
    pixels for sigma > 3, by 0.2 on average and up to 4). DDIM clips D to [-1, 1] but steps
    with the noise estimate of the unclipped D, so each guided step lands off the trajectory
    of either D: the asked digit went from 98% (w = 1) to 51% at w = 3 and 13% at w = 6.
    Here D is projected onto [-1, 1] (Imagen's static thresholding, Saharia et al. 2022) and
    the output returned is the one whose D that is, g + (clamp(D) - D) / c_out: pixels in
    range are untouched, and every sampler, clipping or not, steps toward the same image.
    `data_range` None: a latent model's D, a latent with no range, is not projected.
    """
    guided = unconditional + guidance_scale * (conditional - unconditional)
    if data_range is None:
        return guided
    denoised = c_skip * x + c_out * guided
    return guided + (denoised.clamp(*data_range) - denoised) / c_out


def guidance_at(guidance_scale: float, sigma: float, interval: tuple[float, float] | None) -> float:
    """The guidance scale of a step at noise level sigma: w inside the guidance interval
    (low, high], 1 (the conditional output, one forward pass) outside it; None: every step.

    Guidance at the highest noise levels decides the image's layout from the extrapolated
    output and costs variety; at the lowest it only sharpens (Kynkaanniemi et al. 2024,
    "Applying guidance in a limited interval"). sigma is the noise level of x = y + sigma n,
    for a DDPM step sqrt((1 - alpha_bar) / alpha_bar) (`ddpm_sigma`), EDM's sigma as it is.
    On the digits at w = 4 the DiT's FID went from 1.67x w = 1's to 1.40x with EDM2's
    interval (0.28, 5.42], the asked digit read as often (99.8%).
    """
    if interval is None or guidance_scale <= 1:  # w <= 1 interpolates: no interval
        return guidance_scale
    low, high = interval
    return guidance_scale if low < sigma <= high else 1.0


def ddpm_sigma(scheduler: SchedulerMixin, t: torch.Tensor | float | int) -> float:
    """The noise level sigma of timestep t of a diffusers scheduler, on the host (t is a CPU
    timestep: the samplers keep them there)."""
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


def as_class_labels(class_labels: ClassLabels, class_names: list[str] | None) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------
# EDM: preconditioning, denoiser, noise levels, sampler
# ---------------------------------------------------------------------------------------------


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
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    data_range: tuple[float, float] | None = VALUE_RANGE,
) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) in float32 (the network may autocast);
    with `class_labels`, F is the guided output of scale w (module doc; `data_range` None: a
    latent model's, not projected)."""
    sigma = as_batch_column(sigma, x)
    c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
    x = x.float()
    if class_labels is None:
        output = network_output(net, c_in * x, c_noise.flatten())
    else:
        # The network sees c_in x: D = (c_skip / c_in) (c_in x) + c_out F.
        output = guided_output(
            net, c_in * x, c_noise.flatten(), class_labels, guidance_scale, null_class(net),
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


# ---------------------------------------------------------------------------------------------
# Latent models: decoding
# ---------------------------------------------------------------------------------------------

DECODE_CHUNK = 8  # latents per VAE decode; the last chunk is padded to it


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images (float32, about [-1, 1]) of latents z = (latent - shift) * scale, the scale and
    shift of the VAE's config (per channel where it has latents_mean and latents_std: z =
    (latent - mean) * scale / std, as diffusers' SDXL pipelines read them). Decoded in chunks
    of DECODE_CHUNK, the last padded with zeros, so every decode runs at one batch size and an
    image does not depend on its batch."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32, device=latents.device).view(-1, 1, 1)
                     for v in (mean, std))  # fmt: skip
        z = latents.float() * std / config.scaling_factor + mean
    else:
        z = latents.float() / config.scaling_factor + (config.shift_factor or 0.0)
    images = []
    for start in range(0, len(z), DECODE_CHUNK):
        part = z[start : start + DECODE_CHUNK]
        num = len(part)
        if num < DECODE_CHUNK:
            part = torch.cat([part, part.new_zeros(DECODE_CHUNK - num, *part.shape[1:])])
        decoded = vae.decode(part.to(vae.device, vae.dtype), return_dict=False)[0]
        images.append(decoded[:num].float())
    return torch.cat(images)


# ---------------------------------------------------------------------------------------------
# The pipelines
# ---------------------------------------------------------------------------------------------


class _NetworkPipeline(DiffusionPipeline):
    """One network, as `unet` (a UNet2DModel) or `transformer` (a DiT, as diffusers names it);
    the other component is None. A latent model also has a `vae` (an AutoencoderKL): the
    network denoises its latents and the images are decoded (`decode_latents`). Saves the
    classes and the chosen guidance with the model."""

    _optional_components = ["unet", "transformer", "vae"]
    model_cpu_offload_seq = "unet->transformer->vae"  # those that are set

    def __init__(
        self,
        scheduler: SchedulerMixin,
        unet: UNet2DModel | None = None,
        transformer: DiTTransformer2DModel | None = None,
        class_names: list[str] | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        vae: AutoencoderKL | None = None,
    ) -> None:
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("give the network as either unet (a UNet) or transformer (a DiT)")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(
            class_names=class_names,
            guidance_scale=guidance_scale,
            guidance_interval=None if guidance_interval is None else list(guidance_interval),
        )

    @property
    def network(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    def _guidance(
        self, guidance_scale: float | None, guidance_interval: tuple[float, float] | str | None
    ) -> tuple[float, tuple[float, float] | None]:
        """w and the interval of this call: the saved ones unless given ("all": every step)."""
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if guidance_interval is None:  # an export older than intervals has none: every step
            guidance_interval = getattr(self.config, "guidance_interval", None)
        if guidance_interval is None or guidance_interval == "all":
            return w, None
        low, high = guidance_interval
        return w, (float(low), float(high))

    @property
    def data_range(self) -> tuple[float, float] | None:
        """What guidance projects the clean estimate onto: pixels' range; none for latents."""
        return None if getattr(self, "vae", None) is not None else VALUE_RANGE

    def _labels_and_batch(
        self, class_labels: ClassLabels | None, batch_size: int, generator: Generators
    ) -> tuple[torch.Tensor | None, int]:
        labels = None
        if class_labels is not None:
            labels = as_class_labels(class_labels, self.config.class_names)
            batch_size = len(labels)
            labels = labels.to(self._execution_device)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size}")
        return labels, batch_size

    def _images(self, x: torch.Tensor, output_type: str, return_dict: bool):
        if getattr(self, "vae", None) is not None:  # a latent model: x holds latents
            x = decode_latents(self.vae, x)
        image = (x.clamp(-1, 1) + 1) / 2  # the arithmetic of sample.py's uint8 conversion
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class GuidedDDPMPipeline(_NetworkPipeline):
    """A DDPM network and its noise schedule (any diffusers scheduler: swap in a
    `DDIMScheduler.from_config(pipe.scheduler.config)` for 50-step sampling); class-conditional
    with guidance when it was trained so."""

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
    ) -> ImagePipelineOutput | tuple:
        """One image per entry of `class_labels` (class ids or names; unconditional models:
        `batch_size` images).

        `guidance_scale` and `guidance_interval` (noise levels (low, high] where w > 1 applies,
        "all": every step; `guidance_at`) default to the ones saved with the model.
        `generator`: a list of one generator per image makes each image independent of the
        batch it is drawn in. `eta` applies to DDIM. output_type: "pil", "np" (NHWC in [0, 1])
        or "pt" (NCHW in [0, 1]).
        """
        w, interval = self._guidance(guidance_scale, guidance_interval)
        labels, batch_size = self._labels_and_batch(class_labels, batch_size, generator)
        net, device = self.network, self._execution_device
        shape = (batch_size, *sample_shape(net))
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        x = x * self.scheduler.init_noise_sigma
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            if labels is None:
                output = network_output(net, model_input, t)
            else:
                c_skip, c_out = ddpm_coefficients(self.scheduler, t)
                w_t = guidance_at(w, ddpm_sigma(self.scheduler, t), interval)
                output = guided_output(
                    net, model_input, t, labels, w_t, null_class(net), c_skip, c_out,
                    self.data_range,
                )  # fmt: skip
            x = self.scheduler.step(output.float(), t, x, **kwargs).prev_sample
        return self._images(x, output_type, return_dict)


class EDMPipeline(_NetworkPipeline):
    """EDM sampling: the network as F and the EDM constants of the scheduler.

    The scheduler is diffusers' `EDMEulerScheduler`; its config holds sigma_min, sigma_max,
    sigma_data and rho (its own `step` is the first-order sampler with the same preconditioning).
    """

    def sigmas(self, num_inference_steps: int) -> torch.Tensor:
        config = self.scheduler.config
        return karras_sigmas(num_inference_steps, config.sigma_min, config.sigma_max, config.rho)

    def denoiser(
        self,
        class_labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
    ) -> Denoiser:
        """The D(x, sigma) the sampler calls, guided when given classes and w != 1."""
        sigma_data = self.scheduler.config.sigma_data
        return lambda x, sigma: denoise(
            self.network, x, sigma, sigma_data, class_labels,
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
    ) -> ImagePipelineOutput | tuple:
        """`num_inference_steps` noise levels: Heun makes 2N - 1 network evaluations (18 -> 35).

        `generator`: a list of one generator per image makes each image independent of the
        batch it is drawn in. `churn` > 0 samples stochastically (the paper's S_churn).
        A class-conditional model takes `class_labels` (ids or names; one image each, the batch
        size follows), `guidance_scale` and `guidance_interval` (noise levels (low, high] where
        w > 1 applies, "all": every step; default: the ones saved with the model).
        output_type: "pil", "np" (NHWC floats in [0, 1]) or "pt" (NCHW floats in [0, 1]).
        """
        labels, batch_size = self._labels_and_batch(class_labels, batch_size, generator)
        w, interval = self._guidance(guidance_scale, guidance_interval)
        shape = (batch_size, *sample_shape(self.network))
        device = self._execution_device
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        x, _ = edm_sample(
            self.denoiser(labels, w, interval),
            noise,
            self.sigmas(num_inference_steps),
            second_order=second_order,
            churn=churn,
            generator=generator,
        )
        return self._images(x, output_type, return_dict)
