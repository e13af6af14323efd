"""DDPM's training method: the loss of Algorithm 1, its pictures, model card and export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from torch import nn

from ddp_utils.data import Batch
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from ddp_utils.run import Run
from diffusion.codecs import LatentCodec
from diffusion.conditioning.classes import ClassLabels
from diffusion.conditioning.text import SAMPLING_LINES, TEXT_TO_IMAGE
from diffusion.kinds.common import (
    NUM_LOSS_BINS,
    NetworkMethod,
    card_tags,
    codec_facts,
    condition_facts,
    denoising_strip,
    network_fact,
    remote_code_lines,
    report_by_bin,
)
from diffusion.kinds.ddpm import pipeline
from diffusion.kinds.ddpm.formulation import VALUE_RANGE, NoiseTables, diffusion_loss
from diffusion.kinds.ddpm.pipeline import GuidedDDPMPipeline
from diffusion.kinds.ddpm.samplers import make_inference_scheduler
from diffusion.kinds.registry import Kind
from diffusion.networks import Backbone

# diffusers' own DiTPipeline, from the components of a class-conditional latent DiT's export.
# It fits at guidance_scale 1 only: for w > 1 it feeds class id 1000 as "no class" (this
# model's is its number of classes) and does not project the guided estimate; its
# `1 / scaling_factor` decode ignores a shift_factor (SD3's VAE has one) and per-channel
# latents_mean/latents_std (Playground v2.5's): not offered for those.
DIT_PIPELINE_LINES = (
    "# or diffusers' own DiTPipeline (no code of ours), at guidance_scale=1:\n"
    "from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel\n"
    'folder = "path/to/this/folder"\n'
    "pipeline = DiTPipeline(\n"
    '    transformer=DiTTransformer2DModel.from_pretrained(f"{folder}/transformer", use_safetensors=True),\n'
    '    vae=AutoencoderKL.from_pretrained(f"{folder}/vae", use_safetensors=True),\n'
    '    scheduler=DDIMScheduler.from_pretrained(f"{folder}/scheduler", use_safetensors=True),\n'
    ")\n"
    "images = pipeline(class_labels=[0, 1, 2], guidance_scale=1.0, num_inference_steps=50).images"
)

TARGETS = {  # what a DDPM network is trained to predict, in words
    "epsilon": "the noise (epsilon)",
    "v_prediction": "the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0",
    "sample": "the clean image",
}


class DDPMMethod(NetworkMethod):
    """Ho et al. 2020: regress the noise (or x0, or v) added at a random timestep."""

    pipeline_code = pipeline

    def __init__(
        self,
        kind: Kind,
        run: Run,
        scheduler: DDPMScheduler,
        backbone: Backbone,
        codec: LatentCodec | None = None,
    ) -> None:
        super().__init__(kind, run, scheduler, backbone, codec)
        # Every per-timestep table on the device now: a step copies nothing from the host.
        self.tables = NoiseTables.build(scheduler, self.device)

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        # Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), regress the target at x_t.
        x0, num_timesteps = batch.images, self.cfg.num_train_timesteps
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        condition = self.source.training(batch.condition, generator)
        loss, per_sample = diffusion_loss(
            model, self.tables, x0, t, noise, self.cfg.min_snr_gamma, condition
        )
        report_by_bin(stats, "loss_t_q", t * NUM_LOSS_BINS // num_timesteps, per_sample)
        return loss

    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """The denoising strip: x_t of the grid's first 8 samples, every 1/10 of the steps."""
        indices = range(min(8, self.cfg.num_sample_images))
        sampler = make_inference_scheduler(self.choice.name, self.scheduler.config)
        sampler.set_timesteps(self.choice.steps)  # Heun: 2N - 1 network evaluations
        every = math.ceil(len(sampler.timesteps) / 10)
        return denoising_strip(self._sample(net, indices, every)[1])

    @torch.no_grad()
    def data_pictures(self) -> dict[str, np.ndarray]:
        """A real batch noised at timesteps spread over 0..T-1 (a latent model's latents,
        noised, then decoded)."""
        x0 = self.data_batch(8)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        rows = []
        for t in torch.linspace(0, self.cfg.num_train_timesteps - 1, 8).long():
            noise = torch.randn(x0.shape, generator=generator, device=self.device)
            rows.append(self.scheduler.add_noise(x0, noise, t.repeat(len(x0)).to(self.device)))
        noised = to_uint8(self.shown(torch.cat(rows)), VALUE_RANGE)
        return {"forward_noising": make_grid(noised, nrow=len(x0))}

    def _dit_pipeline_fits(self) -> bool:
        """diffusers' DiTPipeline runs a class-conditional DiT on latents (at guidance 1: its
        guidance uses class 1000 as "no class" and does not project; DIT_PIPELINE_LINES)."""
        return bool(
            self.codec
            and self.codec.plain_scale  # it decodes latents / scaling_factor, nothing else
            and self.source.conditional
            and isinstance(self.source, ClassLabels)
            and self.backbone.network_class is DiTTransformer2DModel
        )

    def _stock_pipeline(self) -> bool:
        """An unconditional pixel UNet loads in diffusers' own DDPMPipeline; the rest ship code."""
        return (
            not self.source.conditional
            and self.backbone.network_class is UNet2DModel
            and not self.codec
        )

    def card(self) -> CardFacts:
        cfg, source = self.cfg, self.source
        kind = f"{source.title} DDPM" if source.conditional else "DDPM"
        eta = f", eta {self.choice.knob('eta'):g}" if "eta" in self.choice.knobs else ""
        if self.run.base is not None:
            load = self.base_load_lines()
        elif self._stock_pipeline():
            load = (
                "from diffusers import DDPMPipeline\n"
                'pipeline = DDPMPipeline.from_pretrained("path/to/this/folder", '
                "use_safetensors=True)\n"
                "images = pipeline(batch_size=16, num_inference_steps=1000).images  # PIL images"
            )
        elif source.title == TEXT_TO_IMAGE:
            load = SAMPLING_LINES
        elif source.conditional:
            load = remote_code_lines(
                "path/to/this/folder", "class_labels=[0, 1, 2], guidance_scale=1.5"
            )
        else:
            load = remote_code_lines("path/to/this/folder", "batch_size=16")
        if self._dit_pipeline_fits():
            load += "\n\n" + DIT_PIPELINE_LINES
        network = self.backbone.network_class.__name__
        return CardFacts(
            title=f"{kind} on {cfg.dataset}",
            summary=(
                f"A denoising diffusion model (Ho et al. 2020) generating {cfg.resolution}x"
                f"{cfg.resolution} images like those of {cfg.dataset}: a {network} trained to "
                f"predict {TARGETS[cfg.prediction_type]} at one of {cfg.num_train_timesteps} noise "
                f"levels of the {cfg.beta_schedule} schedule."
            ),
            script=self.kind.trained_by,
            sampler=(
                f"`{cfg.sample_scheduler}` with {cfg.sample_steps} steps{eta} made the grid "
                "above (`python sample.py <folder> --scheduler ...` lists the others); "
                "diffusers' DDPMScheduler with 1000 steps is the slow reference."
            ),
            how_to_load=load,
            facts=[
                (
                    "objective",
                    f"DDPM, {cfg.prediction_type} prediction, {cfg.beta_schedule} "
                    f"schedule, T = {cfg.num_train_timesteps}",
                ),
                network_fact(cfg, self.backbone),
                *self.base_facts(),
                *codec_facts(self.codec),
                *condition_facts(source, self.guidance),
            ],  # fmt: skip
            tags=card_tags("ddpm", source, self.backbone),
            class_conditional=isinstance(source, ClassLabels),
        )

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A diffusers DDPMPipeline folder (EMA weights) for an unconditional UNet, the base's
        stock pipeline for a fine-tune of one, else a GuidedDDPMPipeline with its
        `pipeline.py`; the raw weights in `<component>_raw/`."""
        if self.run.base is not None:
            self.export_base(folder, net, raw)
        elif self._stock_pipeline():
            DDPMPipeline(unet=net, scheduler=self.scheduler).save_pretrained(
                folder, safe_serialization=True
            )
            self.finish_export(folder, raw)
        else:
            self.export_pipeline(folder, net, raw, GuidedDDPMPipeline)
