"""Class-conditional DDPM sampling with classifier-free guidance, as a diffusers pipeline.

This one file is shipped as `pipeline.py` in every class-conditional DDPM export, so that

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
    images = pipe(class_labels=[3, 7], guidance_scale=1.5).images   # or class names: ["3", "7"]

runs the model with nothing but diffusers installed (an unconditional DDPM export is a plain
`DDPMPipeline` folder instead). The toolkit imports the same file (`guided_output`) for the
training grids and `sample.py`, so the three agree image for image. It may import only torch
and diffusers.

Classifier-free guidance (Ho & Salimans 2022): the UNet learned both p(x | c) and, with labels
replaced by a "no class" index during training, p(x). Sampling follows

    eps = eps(x, null) + w (eps(x, c) - eps(x, null))

w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1 trades variety for
samples that look more like their class.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

Generators = torch.Generator | list[torch.Generator] | None


def null_class(unet: torch.nn.Module) -> int:
    """The "no class" index: the last of the UNet's class embeddings."""
    config = getattr(unet, "config", None) or unet.module.config  # DDP keeps it on .module
    return int(config.num_class_embeds) - 1


def guided_output(
    unet: torch.nn.Module,
    x: torch.Tensor,
    timestep: torch.Tensor | float | int,
    class_labels: torch.Tensor,
    guidance_scale: float,
    null_label: int,
) -> torch.Tensor:
    """The UNet's output for classes `class_labels` (B,), guided with scale w.

    w = 1 and w = 0 need one forward pass (the conditional or the "no class" one); any other w
    runs both in one batched forward of [x, x] with [labels, null]: at most 2x the cost of an
    unguided step, in one kernel launch per layer.
    """
    if guidance_scale in (0.0, 1.0):
        labels = (
            class_labels if guidance_scale == 1.0 else torch.full_like(class_labels, null_label)
        )
        return unet(x, timestep, class_labels=labels, return_dict=False)[0]
    if torch.is_tensor(timestep) and timestep.ndim > 0:
        timestep = torch.cat([timestep, timestep])
    labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
    conditional, unconditional = unet(
        torch.cat([x, x]), timestep, class_labels=labels, return_dict=False
    )[0].chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


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


class GuidedDDPMPipeline(DiffusionPipeline):
    """A class-conditional UNet2DModel and a noise schedule (any diffusers scheduler: swap in a
    `DDIMScheduler.from_config(pipe.scheduler.config)` for 50-step sampling)."""

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        class_names: list[str] | None = None,
        guidance_scale: float = 1.5,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # Saved in model_index.json: the classes by name, and the guidance the toolkit chose.
        self.register_to_config(class_names=class_names, guidance_scale=guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor,
        guidance_scale: float | None = None,
        num_inference_steps: int = 1000,
        generator: Generators = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """One image per entry of `class_labels` (class ids or names).

        `guidance_scale` defaults to the one saved with the model. `generator`: a list of one
        generator per image makes each image independent of the batch it is drawn in. `eta`
        applies to DDIM. output_type: "pil", "np" (NHWC in [0, 1]) or "pt" (NCHW in [0, 1]).
        """
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        device = self._execution_device
        labels = as_class_labels(class_labels, self.config.class_names).to(device)
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(f"{len(generator)} generators for {len(labels)} class labels")
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (len(labels), self.unet.config.in_channels, height, width)
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        x = x * self.scheduler.init_noise_sigma
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs = {"eta": eta} if "eta" in accepted else {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        self.scheduler.set_timesteps(num_inference_steps)
        null = null_class(self.unet)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            output = guided_output(self.unet, model_input, t, labels, w, null)
            x = self.scheduler.step(output.float(), t, x, **kwargs).prev_sample
        image = (x.clamp(-1, 1) + 1) / 2
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
