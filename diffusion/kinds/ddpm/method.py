"""DDPM's training method: the loss of Algorithm 1, its pictures, model card and export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from ddp_utils.data import Batch
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from ddp_utils.run import Run
from diffusion.codecs import LatentCodec
from diffusion.conditioning.classes import ClassLabels
from diffusion.conditioning.text import TextCondition
from diffusion.dreambooth import prior_preservation_weights
from diffusion.kinds.common import (
    NUM_LOSS_BINS,
    NetworkMethod,
    card_tags,
    codec_facts,
    condition_arguments,
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
from diffusion.pipeline_code.core import Condition, cat_conditions

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

# diffusers' own text-to-image pipelines, and the parts a run needs for one to draw its images:
# a DDPM network predicting epsilon or v (what their schedulers step) on an AutoencoderKL's
# latents z = latent * scaling_factor (they decode latents / scaling_factor: a shift_factor or
# per-channel latents_mean/latents_std is ignored, so such a VAE's runs ship their own
# pipeline), and the network and text encoder of the pipeline's model, conditioned as it
# conditions them:
# - StableDiffusionPipeline: a UNet2DConditionModel reading a CLIPTextModel's whole padded
#   sequence without a mask (its text_encoder(...)[0]: a CLIPTextModelWithProjection's would
#   be the projected pooled embedding); the text model is called without the mask, as training
#   encoded (`shipped` unsets use_attention_mask);
# - PixArtAlphaPipeline: a PixArtTransformer2DModel reading a T5EncoderModel's sequence with its
#   mask (the pipeline lowercases prompts: the card says so).
# Other runs (EDM, flow, pixels, other pairs) export the kind's own pipeline, which takes
# prompts too (with trust_remote_code=True).
STOCK_TEXT_PIPELINES: dict[tuple[type, str], type[DiffusionPipeline]] = {
    (UNet2DConditionModel, "CLIPTextModel"): StableDiffusionPipeline,
    (PixArtTransformer2DModel, "T5EncoderModel"): PixArtAlphaPipeline,
}
STOCK_PREDICTIONS = ("epsilon", "v_prediction")

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
        if (
            self.stock_text_parts() is StableDiffusionPipeline
            and scheduler.config.steps_offset != 1
        ):
            # StableDiffusionPipeline sets its scheduler's steps_offset to 1 whatever the
            # folder says (diffusers' rule for configs older than its 0.9): such a run samples
            # so from the start, its grids and sample.py as that pipeline (SCHEDULE_KEYS).
            self.scheduler = type(scheduler).from_config(scheduler.config, steps_offset=1)
        # Every per-timestep table on the device now: a step copies nothing from the host.
        self.tables = NoiseTables.build(self.scheduler, self.device)

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        x0, noise, t, condition = self.draws(batch, generator)
        weights, num_instance = None, len(x0)
        if batch.prior is not None:  # DreamBooth: the class examples beside, in one forward
            prior = self.draws(batch.prior, batch.prior_generator)
            weights = prior_preservation_weights(
                num_instance, len(prior[0]), self.cfg.prior_loss_weight, x0.device
            )
            x0, noise, t = (torch.cat(pair) for pair in zip((x0, noise, t), prior[:3]))
            condition = cat_conditions(condition, prior[3])
        loss, per_sample = diffusion_loss(
            model, self.tables, x0, t, noise, self.cfg.min_snr_gamma, condition, weights
        )
        bins = t * NUM_LOSS_BINS // self.cfg.num_train_timesteps
        report_by_bin(stats, "loss_t_q", bins, per_sample)
        if batch.prior is not None:
            stats.report("instance_loss", per_sample[:num_instance])
            stats.report("prior_loss", per_sample[num_instance:])
        return loss

    def draws(
        self, batch: Batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Condition]:
        """Algorithm 1's draws for a batch: (x0, eps ~ N(0, I), t ~ U{0..T-1}, its training
        condition), from `generator`."""
        x0 = batch.images
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), generator=generator,
                          device=x0.device)  # fmt: skip
        return x0, noise, t, self.source.training(batch.condition, generator)

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

    def stock_text_parts(self) -> type[DiffusionPipeline] | None:
        """The diffusers text-to-image pipeline whose parts this run's are
        (STOCK_TEXT_PIPELINES: network, text encoder, latents, prediction; an image size it
        takes), or None."""
        codec, source = self.codec, self.source
        if not isinstance(source, TextCondition) or codec is None or not codec.plain_scale:
            return None
        if self.cfg.prediction_type not in STOCK_PREDICTIONS or self.cfg.resolution % 8:
            return None  # (both pipelines refuse image sizes that are not multiples of 8)
        encoder = source.encoder_facts.get("class")
        return STOCK_TEXT_PIPELINES.get((self.backbone.network_class, encoder))

    def stock_text_pipeline(self) -> type[DiffusionPipeline] | None:
        """The diffusers text-to-image pipeline the export is, or None (the shipped
        GuidedDDPMPipeline): the run's parts are its model's, and its guidance is the run's.
        They guide every step at w > 1 (no guidance interval) and give the conditional output
        at w <= 1 (w < 1 interpolates here): a run guided only in an interval, or at w < 1,
        ships its own pipeline, which draws its grids."""
        pipeline = self.stock_text_parts()
        scale, interval = self.guidance.scale, self.guidance.interval
        if pipeline is None or scale < 1 or (scale > 1 and interval is not None):
            return None
        return pipeline

    def stock_text_lines(self, pipeline: type[DiffusionPipeline]) -> str:
        """How the card says to sample a stock text-to-image export: the grid's prompts,
        guidance, sampler steps and eta."""
        name = pipeline.__name__
        call = condition_arguments(self.source, self.guidance).removeprefix("prompt=")
        call += f", num_inference_steps={self.choice.steps}"
        if "eta" in self.choice.knobs:
            call += f", eta={self.choice.knob('eta'):g}"
        notes = (
            "# It does not round the prompts' embeddings to float16 as training stored the\n"
            "# captions' (sample.py does): for the same prompts and seeds its images can\n"
            "# differ slightly from sample.py's (by 1 of 255 levels on a few pixels in tests)."
        )
        if pipeline is PixArtAlphaPipeline:
            length = self.source.encoder_facts.get("max_length")
            call += (f", max_sequence_length={length}, use_resolution_binning=False, "
                     "clean_caption=False")  # fmt: skip
            notes += (
                "\n# PixArtAlphaPipeline lowercases prompts (and strips them) before encoding:"
                "\n# prompts in lower case are encoded as training and sample.py encode them."
            )
        return (
            f"from diffusers import {name}\n"
            f'pipeline = {name}.from_pretrained("path/to/this/folder", use_safetensors=True)\n'
            f"images = pipeline({call}).images  # PIL images\n{notes}"
        )

    def card(self) -> CardFacts:
        cfg, source = self.cfg, self.source
        kind = f"{source.title} DDPM" if source.conditional else "DDPM"
        eta = f", eta {self.choice.knob('eta'):g}" if "eta" in self.choice.knobs else ""
        stock_text = None if self.run.base is not None else self.stock_text_pipeline()
        if self.run.base is not None:
            load = self.base_load_lines()
        elif self._stock_pipeline():
            load = (
                "from diffusers import DDPMPipeline\n"
                'pipeline = DDPMPipeline.from_pretrained("path/to/this/folder", '
                "use_safetensors=True)\n"
                "images = pipeline(batch_size=16, num_inference_steps=1000).images  # PIL images"
            )
        elif stock_text is not None:
            load = self.stock_text_lines(stock_text)
        else:
            load = remote_code_lines(
                "path/to/this/folder", condition_arguments(source, self.guidance)
            )
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
            grid_caption=source.grid_caption(),
            class_conditional=isinstance(source, ClassLabels),
            text_to_image=isinstance(source, TextCondition),
        )

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A diffusers DDPMPipeline folder (EMA weights) for an unconditional UNet, the base's
        stock pipeline for a fine-tune of one, a StableDiffusionPipeline or PixArtAlphaPipeline
        folder for a text model of their parts (`stock_text_pipeline`), else a
        GuidedDDPMPipeline with its `pipeline.py`; the raw weights in `<component>_raw/`."""
        stock_text = None if self.run.base is not None else self.stock_text_pipeline()
        if self.run.base is not None:
            self.export_base(folder, net, raw)
        elif self._stock_pipeline():
            DDPMPipeline(unet=net, scheduler=self.scheduler).save_pretrained(
                folder, safe_serialization=True
            )
            self.finish_export(folder, raw)
        elif stock_text is not None:
            self.export_stock_text(folder, net, raw, stock_text)
        else:
            self.export_pipeline(folder, net, raw, GuidedDDPMPipeline)

    def export_stock_text(
        self, folder: Path, net: nn.Module, raw: nn.Module, pipeline: type[DiffusionPipeline]
    ) -> None:
        """A folder `pipeline` loads with nothing of ours: the EMA network, the VAE, the text
        encoder and tokenizer (`shipped`), and as its scheduler the grids' sampler (diffusers'
        scheduler of that name from the training schedule, latents unclipped): called with the
        card's arguments, the pipeline draws the grid's images."""
        encoder = self.shipped_text_encoder()
        scheduler = make_inference_scheduler(self.choice.name, dict(self.scheduler.config),
                                             clip_sample=False)  # fmt: skip
        parts = {"vae": self.codec.vae, "text_encoder": encoder.model,
                 "tokenizer": encoder.tokenizer, "scheduler": scheduler,
                 self.backbone.component: net}  # fmt: skip
        if pipeline is StableDiffusionPipeline:  # no safety checker: a model of the user's data
            parts.update(safety_checker=None, feature_extractor=None,
                         requires_safety_checker=False)  # fmt: skip
        pipeline(**parts).save_pretrained(folder, safe_serialization=True)
        self.finish_export(folder, raw)
