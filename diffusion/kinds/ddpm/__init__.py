"""DDPM (Ho et al. 2020): a network regresses the noise (or x0, or v) added at one of T
timesteps; sampled by diffusers' schedulers (DDPM, DDIM, DPM-Solver, UniPC, Euler, Heun).

    formulation.py  the noise schedule, its tables on the device, targets, min-SNR, the loss
    options.py      its config section, checks, and what a fine-tune takes from a model
    samplers.py     the samplers (diffusers' schedulers) and the guided network output
    method.py       the training method: loss, pictures, model card, export
    pipeline.py     GuidedDDPMPipeline, shipped in exports
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler
from torch import nn

from diffusion.codecs import LatentCodec
from diffusion.kinds.ddpm import options
from diffusion.kinds.ddpm.formulation import VALUE_RANGE, make_train_scheduler
from diffusion.kinds.ddpm.method import DDPMMethod
from diffusion.kinds.ddpm.samplers import (
    SAMPLERS,
    make_inference_scheduler,
    network_denoiser,
    sample_ddpm,
)
from diffusion.kinds.registry import NullCondition, SamplerChoice, register
from diffusion.networks import Backbone
from diffusion.sampling import Draw, decoding, on_device


class DDPMKind:
    name = "ddpm"
    summary = "predict the noise (or v) of T discrete timesteps (Ho et al. 2020)"
    trained_by = "train_ddpm.py"
    value_range = VALUE_RANGE
    samplers = SAMPLERS
    default_sampler = "ddim"
    options = options.DDPMOptions

    def check_options(self, cfg: Any) -> None:
        options.check_options(cfg)

    def leave_unused(self, cfg: Any) -> None:
        options.leave_unused(cfg, cfg.objective)

    def take_from_model(self, cfg: Any, scheduler_config: Mapping[str, Any], source: str) -> None:
        options.take_from_model(cfg, scheduler_config, source)

    def resolve(
        self,
        cfg: Any,
        checkpoint_state: Mapping[str, Any] | None,
        data_std: float,
        data_shape: tuple[int, int, int],
    ) -> None:
        """Nothing is left to resolve once the schedule is known."""

    def step_limit(self, sampler: str, scheduler_config: Mapping[str, Any]) -> int | None:
        """A DDPM sampler takes at most the model's training timesteps."""
        return scheduler_config.get("num_train_timesteps")

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
        null: NullCondition | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        compile: tuple[str, str] | None = None,
        codec: LatentCodec | None = None,
    ) -> Draw:
        pixels = codec is None  # latents are neither clipped nor clamped to [-1, 1]
        scheduler = make_inference_scheduler(choice.name, scheduler_config or {}, pixels)

        def draw(indices, condition, every):
            condition = on_device(condition, device)
            model_output = network_denoiser(
                net, condition, None if condition is None else null(len(indices), device),
                guidance_scale, dtype, scheduler=scheduler,
                data_range=VALUE_RANGE if pixels else None,
                guidance_interval=guidance_interval, compile=compile,
            )  # fmt: skip
            return sample_ddpm(
                model_output, scheduler, shape, indices, seed, choice.steps,
                choice.knob("eta"), device, every, clamp=pixels,
            )  # fmt: skip

        return decoding(draw, codec, device)

    def train_scheduler(self, cfg: Any) -> DDPMScheduler:
        """The noise schedule of a run's config (the flags resolved, --init-from's filled)."""
        return make_train_scheduler(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.prediction_type, cfg.beta_start,
            cfg.beta_end,
        )  # fmt: skip

    def method(
        self, run: Any, scheduler: DDPMScheduler, backbone: Backbone, codec: LatentCodec | None
    ) -> DDPMMethod:
        return DDPMMethod(self, run, scheduler, backbone, codec)


DDPM = register(DDPMKind())
