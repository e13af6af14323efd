"""EDM (Karras et al. 2022): the preconditioned denoiser D(x; sigma) around any backbone,
trained on log-normal noise levels and sampled with Heun's or Euler's method."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import EDMEulerScheduler
from torch import nn

from ddp_utils.config import option, require
from ddp_utils.data import Batch
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from ddp_utils.run import Run
from diffusion.codecs import LatentCodec
from diffusion.edm import (
    VALUE_RANGE,
    edm_denoiser,
    edm_loss,
    make_edm_scheduler,
    sample_edm,
    sample_noise_levels,
)
from diffusion.kinds.common import (
    NETWORK_CLASSES,
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
from diffusion.pipeline_code.pipelines import EDMPipeline
from diffusion.sampling import DEFAULT_STEPS, EDM_SAMPLERS

EDM_SECTION = "EDM objective (--objective edm; the paper's CIFAR-10 values)"


@dataclass
class EDMOptions:
    """The EDM objective's section of the training config."""

    p_mean: float = option(
        -1.2, "training noise levels have ln(sigma) ~ N(p_mean, p_std^2)", section=EDM_SECTION
    )
    p_std: float = option(1.2, "see --p-mean", section=EDM_SECTION)
    sigma_data: float | None = option(
        None,
        "standard deviation of the data; default: 0.5 for pixels in [-1, 1], with --vae the "
        "measured standard deviation of the scaled latents, with --init-from its model's",
        section=EDM_SECTION,
    )
    sigma_min: float = option(0.002, "the sampler's lowest noise level", section=EDM_SECTION)
    sigma_max: float = option(
        80.0, "the sampler's highest noise level (its start)", section=EDM_SECTION
    )
    rho: float = option(
        7.0, "spacing of the sampler's noise levels (7: dense near 0)", section=EDM_SECTION
    )

    def check_edm_options(self) -> None:
        require(self.p_std > 0, f"--p-std must be > 0, got {self.p_std}")
        require(
            self.sigma_data is None or self.sigma_data > 0,
            f"--sigma-data must be > 0, got {self.sigma_data}",
        )
        require(
            0 < self.sigma_min < self.sigma_max,
            f"--sigma-min and --sigma-max need 0 < min < max, got {self.sigma_min}, "
            f"{self.sigma_max}",
        )
        require(self.rho > 0, f"--rho must be > 0, got {self.rho}")


class EDMKind:
    name = "edm"
    value_range = VALUE_RANGE
    samplers = EDM_SAMPLERS
    default_sampler = "edm-heun"
    knobs = frozenset({"churn"})  # the stochastic sampler's

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
        config = dict(scheduler_config or {})
        sigma_data = float(config["sigma_data"])

        def draw(indices, labels, every):
            labels = None if labels is None else labels.to(device)
            data_range = VALUE_RANGE if codec is None else None  # latents: no projection
            denoiser = edm_denoiser(
                net, sigma_data, labels, guidance_scale, dtype, data_range,
                guidance_interval=guidance_interval, compile=compile,
            )  # fmt: skip
            return sample_edm(
                denoiser,
                config,
                shape,
                indices,
                seed,
                choice.steps,
                second_order=choice.name == "edm-heun",
                churn=choice.churn,
                device=device,
                progression_every=every,
                clamp=codec is None,
            )

        return decoding(draw, codec, device)

    def train_scheduler(self, cfg: Any) -> EDMEulerScheduler:
        """The export's scheduler: its config carries the EDM constants the sampler needs."""
        return make_edm_scheduler(cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, cfg.rho)

    def method(
        self,
        run: Run,
        scheduler: EDMEulerScheduler,
        backbone: str,
        codec: LatentCodec | None = None,
    ) -> EDMMethod:
        return EDMMethod(run, scheduler, backbone, codec)


EDM = register(EDMKind())


class EDMMethod(NetworkMethod):
    """Karras et al. 2022: the preconditioned denoiser D(x; sigma) around the network."""

    kind = EDM

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
        labels = self.conditioning.training_labels(batch.labels, generator)
        loss, per_sample = edm_loss(model, y, sigma, noise, cfg.sigma_data, labels)
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
        cfg, conditioning = self.cfg, self.conditioning
        kind = "class-conditional EDM" if conditioning.num_classes else "EDM"
        call = "batch_size=16, num_inference_steps=18"
        if conditioning.num_classes:
            call = "class_labels=[0, 1, 2], guidance_scale=1.5, num_inference_steps=18"
        second = " (Heun: 2 network evaluations per step but the last)"
        return CardFacts(
            title=f"{kind} on {cfg.dataset}",
            summary=(
                f"A diffusion model generating {cfg.resolution}x{cfg.resolution} images like "
                f"those of {cfg.dataset}, trained as Karras et al. 2022 (EDM): a "
                f"{NETWORK_CLASSES[self.backbone]} inside the preconditioned denoiser "
                f"D(x; sigma), noise levels ln(sigma) ~ N({cfg.p_mean}, {cfg.p_std}^2), "
                f"sigma_data {cfg.sigma_data}."
            ),
            script="ddpm",
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
                *classes_facts(conditioning),
            ],  # fmt: skip
            tags=card_tags("edm", conditioning, self.backbone),
            class_conditional=bool(conditioning.num_classes),
        )

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A pipeline folder diffusers runs with `trust_remote_code=True`: the EMA network, the
        scheduler holding the EDM constants, `pipeline.py` (the EDMPipeline class), and the
        raw weights in `<component>_raw/`."""
        conditioning = self.conditioning
        pipeline = EDMPipeline(
            self.scheduler,
            **{network_component(net): net},
            class_names=list(conditioning.class_names) or None,
            guidance_scale=conditioning.guidance_scale if conditioning.num_classes else 1.0,
            guidance_interval=conditioning.guidance_interval,
            **self.vae_component(),
        )
        ship_pipeline(pipeline, folder, "EDMPipeline")
        save_raw(folder, raw)
        if self.codec is not None:
            self.codec.ship(folder / "vae")
