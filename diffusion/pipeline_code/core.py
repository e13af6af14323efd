"""The network call, the condition it takes, guidance and decoding: what every shipped pipeline
and every sampler of the toolkit share.

This file, `samplers.py` and a kind's own `pipeline.py` are assembled into the one
`pipeline.py` an export ships (`diffusion.pipeline_code.shipped_source`), so it may import only
torch and diffusers. The toolkit imports the same code for its grids and `sample.py`, so the
three agree image for image.

A condition is a value, not a type: a dict of batch-first tensors, passed to the network as
keyword arguments (`{"class_labels": ids}` for a class-conditional network, `{"encoder_hidden_
states": ...}` for one that attends to text). The toolkit carries it from the batch to the loss
and from the sampler to the network without looking inside; guidance asks the condition's
source for its "no condition" value of the same form. Prompts become a condition through
`encode_text` and `text_condition`, the same calls in training, `sample.py` and the pipelines.

Classifier-free guidance (Ho & Salimans 2022): the network learned both p(x | c) and, with
conditions replaced by "no condition" during training, p(x). Sampling combines the two outputs,
out = out(x, null) + w (out(x, c) - out(x, null)), in one batched forward. w = 1 is the plain
conditional model, w = 0 the unconditional one, w > 1 trades variety for likeness. For w > 1
that is an extrapolation, and the clean image it stands for, D = c_skip x + c_out out, leaves
the data range at high noise; `guide` returns the output whose D is projected back onto
[-1, 1], so that every sampler steps toward an image in range (`guide` says why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

Condition = Mapping[str, torch.Tensor]  # network keyword inputs, batch-first
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, level of shape ())
Generators = torch.Generator | list[torch.Generator] | None
ClassLabels = int | str | list[int | str] | torch.Tensor
Prompts = str | list[str]
VALUE_RANGE = (-1.0, 1.0)  # the images of every network model here (and the samplers' clamp)

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


def always_takes_a_class(net: torch.nn.Module) -> bool:
    """A network whose every call needs a class (adaLN-Zero, as a DiT): an unconditional one is
    built with one class and fed class 0."""
    return getattr(unwrap(net).config, "norm_type", None) == "ada_norm_zero"


def null_class(net: torch.nn.Module) -> int:
    """The "no class" index guidance uses: a UNet's last class embedding; an adaLN network's
    label table has one row past its classes (as diffusers' DiTPipeline's class_null = 1000)."""
    config = unwrap(net).config
    if always_takes_a_class(net):
        return int(config.num_embeds_ada_norm)
    return int(config.num_class_embeds) - 1


def network_output(
    net: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float | int,
    condition: Condition | None = None,
) -> torch.Tensor:
    """The network's prediction for x (B, C, H, W) at time/noise input t, shaped like x.

    `net` may be wrapped (DDP, torch.compile): it is called as given, so gradients synchronise.
    t is given to the network as (B,); `condition` as keyword arguments. A network that always
    takes a class gets class 0 when unconditional; a network with a learned-variance head (2C
    output channels) gives its first C.
    """
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    inputs = dict(condition or {})
    if "class_labels" not in inputs and always_takes_a_class(net):
        inputs["class_labels"] = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    output = net(x, timestep=t, return_dict=False, **inputs)[0]
    return output[:, : x.shape[1]]


def cat_conditions(first: Condition, second: Condition) -> dict[str, torch.Tensor]:
    """Two conditions of the same form as one batch: first's rows, then second's."""
    if first.keys() != second.keys():
        raise ValueError(f"conditions of different forms: {sorted(first)}, {sorted(second)}")
    return {key: torch.cat([first[key], second[key]]) for key in first}


def class_condition(class_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The condition of class ids (B,): what a class-conditional network takes."""
    return {"class_labels": class_labels}


# ---------------------------------------------------------------------------------------------
# Text: prompts encoded by a frozen text model
# ---------------------------------------------------------------------------------------------

# What a cross-attention network takes, as diffusers' UNet2DConditionModel and
# PixArtTransformer2DModel name it.
HIDDEN, MASK = "encoder_hidden_states", "encoder_attention_mask"


def encode_text(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    model_mask: bool,
    penultimate: bool = False,
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(the text model's output, its sequence embeddings (n, L, D), the attention mask (n, L)
    int64) of `texts`, each padded or truncated to `max_length` tokens, on the text model's
    device. The model is given the mask only when `model_mask` (T5 alone, as PixArt-alpha's
    pipeline; CLIP is called without it, as Stable Diffusion's pipelines call it); the
    embeddings are the last layer's states, or the penultimate layer's (SDXL's and SD3's
    CLIPs)."""
    tokens = tokenizer(list(texts), padding="max_length", max_length=max_length,
                       truncation=True, return_tensors="pt")  # fmt: skip
    device = next(text_encoder.parameters()).device
    mask = tokens["attention_mask"].to(device)
    output = text_encoder(input_ids=tokens["input_ids"].to(device),
                          attention_mask=mask if model_mask else None,
                          output_hidden_states=penultimate)  # fmt: skip
    hidden = output.hidden_states[-2] if penultimate else output.last_hidden_state
    return output, hidden, mask.to(torch.int64)


def text_condition(
    hidden: torch.Tensor, mask: torch.Tensor, with_mask: bool
) -> dict[str, torch.Tensor]:
    """What a cross-attention network takes: the sequence embeddings (B, L, D) float32, and
    the attention mask (B, L) int64 where the encoder's family calls for it (T5's: PixArt
    trained with it; not CLIP's: Stable Diffusion's UNet reads the whole padded sequence)."""
    condition = {HIDDEN: hidden.float()}
    if with_mask:
        condition[MASK] = mask.long()
    return condition


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------


def guided_output(
    net: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float | int,
    condition: Condition,
    null: Condition,
    guidance_scale: float,
    c_skip: torch.Tensor | float,
    c_out: torch.Tensor | float,
    data_range: tuple[float, float] | None = VALUE_RANGE,
) -> torch.Tensor:
    """The network's output for `condition`, guided with scale w against `null` (`guide`).

    (c_skip, c_out): the clean image this output stands for at this step is D = c_skip x +
    c_out output (each kind's). w = 1 and w = 0 need one forward pass (the conditional or the
    "no condition" one) and return the network's output unchanged; any other w runs both in
    one batched forward of [x, x] with [condition, null]: at most 2x the cost of an unguided
    step, in one kernel launch per layer.
    """
    if guidance_scale in (0.0, 1.0):
        return network_output(net, x, t, condition if guidance_scale == 1.0 else null)
    if torch.is_tensor(t) and t.ndim > 0:
        t = torch.cat([t, t])
    both = network_output(net, torch.cat([x, x]), t, cat_conditions(condition, null))
    conditional, unconditional = both.chunk(2)
    return guide(conditional, unconditional, guidance_scale, x, c_skip, c_out, data_range)


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
    "Applying guidance in a limited interval"). sigma is the noise-to-signal ratio of the step,
    x = y + sigma n once x is scaled to unit signal (each kind converts its own level). On the
    digits at w = 4 the DiT's FID went from 1.67x w = 1's to 1.40x with EDM2's interval
    (0.28, 5.42], the asked digit read as often (99.8%).
    """
    if interval is None or guidance_scale <= 1:  # w <= 1 interpolates: no interval
        return guidance_scale
    low, high = interval
    return guidance_scale if low < sigma <= high else 1.0


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
# The pipelines' common part
# ---------------------------------------------------------------------------------------------


class NetworkPipeline(DiffusionPipeline):
    """One network, as `unet` (a UNet) or `transformer` (a DiT, as diffusers names them); the
    other component is None. A latent model also has a `vae` (an AutoencoderKL): the network
    denoises its latents and the images are decoded (`decode_latents`). A text-to-image model
    also has its frozen `text_encoder` and `tokenizer`: it takes `prompt` and
    `negative_prompt`, encoded as it was trained (`encode_prompt`). Saves the classes and the
    chosen guidance with the model. Each kind's pipeline adds its `__call__`."""

    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"  # those that are set

    def __init__(
        self,
        scheduler: SchedulerMixin,
        unet: torch.nn.Module | None = None,
        transformer: torch.nn.Module | None = None,
        class_names: list[str] | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | list[float] | None = None,
        vae: AutoencoderKL | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        max_sequence_length: int | None = None,
        prompt_attention_mask: bool = False,
        prompt_embeds_dtype: str | None = None,
        text_model_mask: bool = False,
    ) -> None:
        """A text-to-image model: `text_encoder` and `tokenizer` (transformers'), prompts
        padded or truncated to `max_sequence_length` tokens, the attention mask given to the
        network with the embeddings when `prompt_attention_mask`, the embeddings rounded to
        `prompt_embeds_dtype` (a torch dtype's name: the precision its training stored the
        captions' encodings in) before the network reads them."""
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("give the network as either unet (a UNet) or transformer (a DiT)")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("a text-to-image model needs both its text_encoder and tokenizer")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)  # fmt: skip
        self.register_to_config(
            class_names=class_names,
            guidance_scale=guidance_scale,
            guidance_interval=None if guidance_interval is None else list(guidance_interval),
        )
        if text_encoder is not None:  # the other models' folders hold none of these
            if max_sequence_length is None:
                raise ValueError("a text-to-image model needs its max_sequence_length")
            self.register_to_config(
                max_sequence_length=int(max_sequence_length),
                prompt_attention_mask=bool(prompt_attention_mask),
                prompt_embeds_dtype=prompt_embeds_dtype,
                text_model_mask=bool(text_model_mask),
            )

    @property
    def network(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    @property
    def takes_prompts(self) -> bool:
        return getattr(self, "text_encoder", None) is not None

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

    def encode_prompt(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The condition of `prompts` (one row each), on the execution device: the text
        model's sequence embeddings, rounded as training stored them, and the mask where the
        network takes it."""
        config = self.config
        model_mask = getattr(config, "text_model_mask", False)
        _, hidden, mask = encode_text(self.text_encoder, self.tokenizer, prompts,
                                      config.max_sequence_length, model_mask)  # fmt: skip
        hidden = hidden.float()
        if config.prompt_embeds_dtype is not None:
            hidden = hidden.to(getattr(torch, config.prompt_embeds_dtype)).float()
        condition = text_condition(hidden, mask, config.prompt_attention_mask)
        return {key: value.to(self._execution_device) for key, value in condition.items()}

    def _prompt_conditions(
        self, prompt: Prompts, negative_prompt: Prompts | None, num_images_per_prompt: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the condition, its "no condition") of `num_images_per_prompt` images per prompt,
        prompt by prompt: the negative prompt's (one for all, or one per prompt), the empty
        prompt's by default (what caption dropout trained)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or num_images_per_prompt < 1:
            raise ValueError("give at least one prompt, and num_images_per_prompt >= 1")
        rows = [p for p in prompts for _ in range(num_images_per_prompt)]
        condition = self.encode_prompt(rows)
        if negative_prompt is None or isinstance(negative_prompt, str):
            null = self.encode_prompt([negative_prompt or ""])
            null = {key: value.expand(len(rows), *value.shape[1:]) for key, value in null.items()}
        else:
            if len(negative_prompt) != len(prompts):
                raise ValueError(
                    f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts: give "
                    "one, or one per prompt"
                )
            null = self.encode_prompt([n for n in negative_prompt
                                       for _ in range(num_images_per_prompt)])  # fmt: skip
        return condition, null

    def _conditions(
        self,
        class_labels: ClassLabels | None,
        batch_size: int,
        generator: Generators,
        prompt: Prompts | None = None,
        negative_prompt: Prompts | None = None,
        num_images_per_prompt: int = 1,
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None, int]:
        """(the condition, its "no condition", the batch size) of a call: one image per class
        asked for, or `num_images_per_prompt` per prompt; an unconditional call has neither."""
        condition = null = None
        if self.takes_prompts:
            if prompt is None or class_labels is not None:
                raise ValueError(
                    "this is a text-to-image model: give prompt= (a string or a list: one image "
                    "each), not class_labels"
                )
            condition, null = self._prompt_conditions(prompt, negative_prompt,
                                                      num_images_per_prompt)  # fmt: skip
            batch_size = len(condition[HIDDEN])
        elif prompt is not None or negative_prompt is not None:
            raise ValueError("this model takes no prompts (it has no text encoder)")
        elif class_labels is not None:
            labels = as_class_labels(class_labels, self.config.class_names)
            batch_size = len(labels)
            labels = labels.to(self._execution_device)
            condition = class_condition(labels)
            null = class_condition(torch.full_like(labels, null_class(self.network)))
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size}")
        return condition, null, batch_size

    def _noise(self, batch_size: int, generator: Generators) -> torch.Tensor:
        """N(0, I) of the batch's shape, from `generator` (a list: one per image)."""
        shape = (batch_size, *sample_shape(self.network))
        return randn_tensor(shape, generator=generator, device=self._execution_device,
                            dtype=torch.float32)  # fmt: skip

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
