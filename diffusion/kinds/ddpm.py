"""DDPM (Ho et al. 2020): a network regresses the noise (or x0, or v) added at one of T
timesteps; sampled by diffusers' schedulers (DDPM, DDIM, DPM-Solver, UniPC, Euler, Heun)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from torch import nn

from ddp_utils.config import option, require
from ddp_utils.data import Batch
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from ddp_utils.run import Run
from diffusion.codecs import LatentCodec
from diffusion.ddpm import (
    SCHEDULE_DEFAULTS,
    VALUE_RANGE,
    BetaSchedule,
    NoiseTables,
    PredictionType,
    diffusion_loss,
    make_train_scheduler,
)
from diffusion.kinds.common import (
    NETWORK_CLASSES,
    NUM_LOSS_BINS,
    NetworkMethod,
    card_tags,
    classes_facts,
    codec_facts,
    denoising_strip,
    network_component,
    network_fact,
    remote_code_lines,
    report_by_bin,
    save_raw,
    ship_pipeline,
)
from diffusion.kinds.registry import Draw, SamplerChoice, decoding, register
from diffusion.pipeline_code.pipelines import GuidedDDPMPipeline
from diffusion.sampling import (
    DDPM_SAMPLERS,
    DEFAULT_STEPS,
    make_inference_scheduler,
    network_denoiser,
    sample_ddpm,
)

DDPM_SECTION = "DDPM objective (--objective ddpm; unset: --init-from's, else the defaults)"


@dataclass
class DDPMOptions:
    """The DDPM objective's section of the training config."""

    prediction_type: PredictionType | None = option(
        None,
        f"network target (default: {SCHEDULE_DEFAULTS['prediction_type']})",
        section=DDPM_SECTION,
    )
    beta_schedule: BetaSchedule | None = option(
        None,
        f"noise schedule (default: {SCHEDULE_DEFAULTS['beta_schedule']})",
        section=DDPM_SECTION,
    )
    num_train_timesteps: int | None = option(
        None,
        f"diffusion timesteps T (default: {SCHEDULE_DEFAULTS['num_train_timesteps']})",
        section=DDPM_SECTION,
    )
    min_snr_gamma: float | None = option(
        None, "min-SNR-gamma loss weighting (e.g. 5); none: off", section=DDPM_SECTION
    )

    def check_ddpm_options(self) -> None:
        require(
            self.num_train_timesteps is None or self.num_train_timesteps >= 2,
            f"--num-train-timesteps must be >= 2, got {self.num_train_timesteps}",
        )
        require(
            self.min_snr_gamma is None or self.min_snr_gamma > 0,
            f"--min-snr-gamma must be > 0 or none, got {self.min_snr_gamma}",
        )


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


class DDPMKind:
    name = "ddpm"
    value_range = VALUE_RANGE
    samplers = tuple(DDPM_SAMPLERS)
    default_sampler = "ddim"
    knobs = frozenset({"eta"})  # DDIM's noise scale

    def default_steps(self, sampler: str | None) -> int:
        return DEFAULT_STEPS[sampler or self.default_sampler]

    def sampler(
        self,
        net: nn.Module,
        scheduler_config: Mapping[str, Any] | None,
        choice: SamplerChoice,
        *,
        seed: int,
        shape: tuple[int, int, int],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        compile: tuple[str, str] | None = None,
        codec: LatentCodec | None = None,
    ) -> Draw:
        pixels = codec is None  # latents are neither clipped nor clamped to [-1, 1]
        scheduler = make_inference_scheduler(choice.name, scheduler_config or {}, pixels)

        def draw(indices, labels, every):
            labels = None if labels is None else labels.to(device)
            model_output = network_denoiser(
                net, labels, guidance_scale, dtype, scheduler=scheduler,
                data_range=VALUE_RANGE if pixels else None,
                guidance_interval=guidance_interval, compile=compile,
            )  # fmt: skip
            return sample_ddpm(
                model_output, scheduler, shape, indices, seed, choice.steps, choice.eta, device,
                every, clamp=pixels,
            )  # fmt: skip

        return decoding(draw, codec, device)

    def train_scheduler(self, cfg: Any) -> DDPMScheduler:
        """The noise schedule of a run's config (the flags resolved, --init-from's filled)."""
        return make_train_scheduler(cfg.beta_schedule, cfg.num_train_timesteps, cfg.prediction_type)

    def method(
        self, run: Run, scheduler: DDPMScheduler, backbone: str, codec: LatentCodec | None = None
    ) -> DDPMMethod:
        return DDPMMethod(run, scheduler, backbone, codec)


DDPM = register(DDPMKind())


class DDPMMethod(NetworkMethod):
    """Ho et al. 2020: regress the noise (or x0, or v) added at a random timestep."""

    kind = DDPM

    def __init__(
        self, run: Run, scheduler: DDPMScheduler, backbone: str, codec: LatentCodec | None = None
    ) -> None:
        super().__init__(run, scheduler, backbone, codec)
        # Every per-timestep table on the device now: a step copies nothing from the host.
        self.tables = NoiseTables.build(scheduler, self.device)

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        # Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), regress the target at x_t.
        x0, num_timesteps = batch.images, self.cfg.num_train_timesteps
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        labels = self.conditioning.training_labels(batch.labels, generator)
        loss, per_sample = diffusion_loss(
            model, self.tables, x0, t, noise, self.cfg.min_snr_gamma, labels
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
            and self.conditioning.num_classes
            and self.backbone == "dit"
        )

    def _stock_pipeline(self) -> bool:
        """An unconditional pixel UNet loads in diffusers' own DDPMPipeline; the rest ship code."""
        return not self.conditioning.num_classes and self.backbone == "unet" and not self.codec

    def card(self) -> CardFacts:
        cfg, conditioning = self.cfg, self.conditioning
        kind = "class-conditional DDPM" if conditioning.num_classes else "DDPM"
        eta = f", eta {cfg.sample_eta:g}" if cfg.sample_scheduler == "ddim" else ""
        if self._stock_pipeline():
            load = (
                "from diffusers import DDPMPipeline\n"
                'pipeline = DDPMPipeline.from_pretrained("path/to/this/folder", '
                "use_safetensors=True)\n"
                "images = pipeline(batch_size=16, num_inference_steps=1000).images  # PIL images"
            )
        elif conditioning.num_classes:
            load = remote_code_lines(
                "path/to/this/folder", "class_labels=[0, 1, 2], guidance_scale=1.5"
            )
        else:
            load = remote_code_lines("path/to/this/folder", "batch_size=16")
        if self._dit_pipeline_fits():
            load += "\n\n" + DIT_PIPELINE_LINES
        network = NETWORK_CLASSES[self.backbone]
        return CardFacts(
            title=f"{kind} on {cfg.dataset}",
            summary=(
                f"A denoising diffusion model (Ho et al. 2020) generating {cfg.resolution}x"
                f"{cfg.resolution} images like those of {cfg.dataset}: a {network} trained to "
                f"predict {TARGETS[cfg.prediction_type]} at one of {cfg.num_train_timesteps} noise "
                f"levels of the {cfg.beta_schedule} schedule."
            ),
            script="ddpm",
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
                *codec_facts(self.codec),
                *classes_facts(conditioning),
            ],  # fmt: skip
            tags=card_tags("ddpm", conditioning, self.backbone),
            class_conditional=bool(conditioning.num_classes),
        )

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A diffusers DDPMPipeline folder (EMA weights) for an unconditional UNet, else a
        GuidedDDPMPipeline with its `pipeline.py`; the raw weights in `<component>_raw/`."""
        conditioning = self.conditioning
        if self._stock_pipeline():
            DDPMPipeline(unet=net, scheduler=self.scheduler).save_pretrained(
                folder, safe_serialization=True
            )
        else:
            pipeline = GuidedDDPMPipeline(
                self.scheduler,
                **{network_component(net): net},
                class_names=list(conditioning.class_names) or None,
                guidance_scale=conditioning.guidance_scale if conditioning.num_classes else 1.0,
                guidance_interval=conditioning.guidance_interval,
                **self.vae_component(),
            )
            ship_pipeline(pipeline, folder, "GuidedDDPMPipeline")
        save_raw(folder, raw)
        if self.codec is not None:
            self.codec.ship(folder / "vae")
