"""Rectified flow's training method: the flow-matching loss, its pictures, model card and
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
from diffusion.kinds.flow import pipeline
from diffusion.kinds.flow.formulation import VALUE_RANGE, flow_loss, sample_times, shift_times
from diffusion.kinds.flow.pipeline import FlowPipeline


class FlowMethod(NetworkMethod):
    """Rectified flow: regress the velocity n - x_0 of the linear path at sampled times."""

    pipeline_code = pipeline

    @property
    def shift(self) -> float:
        return float(self.cfg.time_shift)

    def task_info(self) -> dict[str, Any]:
        cfg = self.cfg
        times = {"distribution": cfg.time_sampling, "shift": self.shift}
        if cfg.time_sampling == "logit-normal":
            times.update(logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
        elif cfg.time_sampling == "mode":
            times["mode_scale"] = cfg.mode_scale
        return {**super().task_info(), "time_sampling": times}

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        # t from the training distribution, shifted; n ~ N(0, I); regress n - x_0 at x_t.
        x0, cfg = batch.images, self.cfg
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        times = sample_times(
            len(x0), cfg.time_sampling, generator, cfg.logit_mean, cfg.logit_std, cfg.mode_scale
        )
        t = shift_times(times, self.shift)
        condition = self.source.training(batch.condition, generator)
        loss, per_sample = flow_loss(model, x0, t, noise, condition)
        bins = (t * NUM_LOSS_BINS).long().clamp(max=NUM_LOSS_BINS - 1)
        report_by_bin(stats, "loss_t_q", bins, per_sample)
        return loss

    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """The denoising strip: x_t / std(x_t) of the grid's first 8 samples."""
        indices = range(min(8, self.cfg.num_sample_images))
        every = math.ceil(self.choice.steps / 10)  # at most 10 rows
        return denoising_strip(self._sample(net, indices, every)[1])

    @torch.no_grad()
    def data_pictures(self) -> dict[str, np.ndarray]:
        """A real batch at 8 times from 0 to 1, x_t / std(x_t) (a latent model's decoded)."""
        x0 = self.data_batch(8)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        rows = []
        for t in np.linspace(0.0, 1.0, 8):
            noise = torch.randn(x0.shape, generator=generator, device=self.device)
            x_t = (1 - t) * x0 + t * noise
            rows.append(x_t / math.sqrt((1 - t) ** 2 + t**2))
        noised = to_uint8(self.shown(torch.cat(rows)), VALUE_RANGE)
        return {"forward_noising": make_grid(noised, nrow=len(x0))}

    def card(self) -> CardFacts:
        cfg, source, choice = self.cfg, self.source, self.choice
        kind = f"{source.title} rectified flow" if source.conditional else "Rectified flow"
        call = (
            f"{condition_arguments(source, self.guidance)}, num_inference_steps={choice.steps}, "
            f"sampler={choice.name!r}"
        )
        times = cfg.time_sampling + (
            f" (mean {cfg.logit_mean:g}, std {cfg.logit_std:g})"
            if cfg.time_sampling == "logit-normal"
            else ""
        )
        return CardFacts(
            title=f"{kind} on {cfg.dataset}",
            summary=(
                f"A rectified flow (Liu et al. 2022; Esser et al. 2024) generating "
                f"{cfg.resolution}x{cfg.resolution} images like those of {cfg.dataset}: a "
                f"{self.backbone.network_class.__name__} trained to predict the velocity n - x_0 "
                "of x_t = (1 - t) x_0 + t n, sampled by integrating it from noise (t = 1) to "
                "the image (t = 0)."
            ),
            script=self.kind.trained_by,
            sampler=(
                f"`{choice.name}` with {choice.steps} steps over the scheduler's times (shift "
                f"{self.shift:g}) made the grid above; `sampler=` names the others (heun, "
                "dpm++2m, euler-ancestral)."
            ),
            how_to_load=remote_code_lines("path/to/this/folder", call),
            facts=[
                (
                    "objective",
                    f"rectified flow, velocity target, times {times}, shift {self.shift:g}",
                ),
                network_fact(cfg, self.backbone),
                *codec_facts(self.codec),
                *condition_facts(source, self.guidance),
            ],  # fmt: skip
            tags=card_tags("rectified-flow", source, self.backbone),
            grid_caption=source.grid_caption(),
            class_conditional=isinstance(source, ClassLabels),
            text_to_image=isinstance(source, TextCondition),
        )

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A pipeline folder diffusers runs with `trust_remote_code=True`: the EMA network, its
        FlowMatchEulerDiscreteScheduler, `pipeline.py` (FlowPipeline) and the raw weights."""
        self.export_pipeline(folder, net, raw, FlowPipeline)
