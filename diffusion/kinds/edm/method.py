"""EDM's training method: the loss on log-normal noise levels, its pictures, model card and
export."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddp_utils.data import Batch
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from diffusion.conditioning.classes import ClassLabels
from diffusion.conditioning.text import TextCondition
from diffusion.kinds.common import (
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
from diffusion.kinds.edm import pipeline
from diffusion.kinds.edm.formulation import VALUE_RANGE, edm_loss, sample_noise_levels
from diffusion.kinds.edm.pipeline import EDMPipeline


class EDMMethod(NetworkMethod):
    """Karras et al. 2022: the preconditioned denoiser D(x; sigma) around the network."""

    pipeline_code = pipeline

    def task_info(self) -> dict[str, Any]:
        cfg = self.cfg
        distribution = {"p_mean": cfg.p_mean, "p_std": cfg.p_std}
        return {**super().task_info(), "noise_level_distribution": distribution}

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        # Table 1 (training): ln(sigma) ~ N(P_mean, P_std^2), n ~ N(0, I), x = y + sigma n.
        y, cfg = batch.images, self.cfg
        noise = torch.randn(y.shape, generator=generator, device=y.device)
        sigma = sample_noise_levels(len(y), cfg.p_mean, cfg.p_std, generator)
        condition = self.source.training(batch.condition, generator)
        loss, per_sample = edm_loss(model, y, sigma, noise, cfg.sigma_data, condition)
        # Quarters of the training distribution: z = (ln sigma - P_mean) / P_std vs N(0, 1)'s.
        z = (sigma.log() - cfg.p_mean) / cfg.p_std
        bins = (z > -0.6745).long() + (z > 0).long() + (z > 0.6745).long()
        report_by_bin(stats, "loss_sigma_q", bins, per_sample)
        return loss

    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """The denoising strip: x_i / sqrt(1 + sigma_i^2) of the grid's first 8 samples."""
        indices = range(min(8, self.cfg.num_sample_images))
        every = math.ceil(self.cfg.sample_steps / 10)  # at most 10 rows
        return denoising_strip(self._sample(net, indices, every)[1])

    @torch.no_grad()
    def data_pictures(self) -> dict[str, np.ndarray]:
        """A real batch at 8 noise levels from sigma_min to sigma_max, as y_sigma / sqrt(1 +
        sigma^2) (the variance-preserving scale of the DDPM strip; a latent model's decoded)."""
        cfg = self.cfg
        y = self.data_batch(8)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        rows = []
        for sigma in np.geomspace(cfg.sigma_min, cfg.sigma_max, 8):
            noise = torch.randn(y.shape, generator=generator, device=self.device)
            rows.append((y + sigma * noise) / math.sqrt(1 + sigma**2))
        noised = to_uint8(self.shown(torch.cat(rows)), VALUE_RANGE)
        return {"forward_noising": make_grid(noised, nrow=len(y))}

    def card(self) -> CardFacts:
        cfg, source = self.cfg, self.source
        kind = f"{source.title} EDM" if source.conditional else "EDM"
        call = f"{condition_arguments(source, self.guidance)}, num_inference_steps=18"
        second = " (Heun: 2 network evaluations per step but the last)"
        return CardFacts(
            title=f"{kind} on {cfg.dataset}",
            summary=(
                f"A diffusion model generating {cfg.resolution}x{cfg.resolution} images like "
                f"those of {cfg.dataset}, trained as Karras et al. 2022 (EDM): a "
                f"{self.backbone.network_class.__name__} inside the preconditioned denoiser "
                f"D(x; sigma), noise levels ln(sigma) ~ N({cfg.p_mean}, {cfg.p_std}^2), "
                f"sigma_data {cfg.sigma_data}."
            ),
            script=self.kind.trained_by,
            sampler=(
                f"`{cfg.sample_scheduler}` with {cfg.sample_steps} noise levels from sigma "
                f"{cfg.sigma_max:g} to {cfg.sigma_min:g} (rho {cfg.rho:g})"
                + (second if cfg.sample_scheduler == "edm-heun" else "")
                + " made the grid above; `churn=` > 0 makes it stochastic."
            ),
            how_to_load=remote_code_lines("path/to/this/folder", call),
            facts=[
                (
                    "objective",
                    f"EDM, sigma_data {cfg.sigma_data}, P_mean {cfg.p_mean}, P_std {cfg.p_std}",
                ),
                network_fact(cfg, self.backbone),
                *codec_facts(self.codec),
                *condition_facts(source, self.guidance),
            ],  # fmt: skip
            tags=card_tags("edm", source, self.backbone),
            grid_caption=source.grid_caption(),
            class_conditional=isinstance(source, ClassLabels),
            text_to_image=isinstance(source, TextCondition),
        )

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A pipeline folder diffusers runs with `trust_remote_code=True`: the EMA network, the
        scheduler holding the EDM constants, `pipeline.py` (the EDMPipeline class), and the
        raw weights in `<component>_raw/`."""
        self.export_pipeline(folder, net, raw, EDMPipeline)
