"""Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023; SD3, Esser et al. 2024):
x_t = (1 - t) x_0 + t n, a network regressing the velocity n - x_0 at logit-normal times,
sampled by the samplers written once over a denoiser (Euler, Heun, DPM-Solver++(2M),
ancestral) over diffusers' FlowMatchEulerDiscreteScheduler's shifted times.

    formulation.py  time sampling and shift, the loss, the guided denoiser, sampling
    options.py      its config section, checks, and what a fine-tune takes from a model
    method.py       the training method: loss, pictures, model card, export
    pipeline.py     the linear path, the denoiser, FlowPipeline: shipped in exports
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from diffusion.codecs import LatentCodec
from diffusion.kinds.flow import options
from diffusion.kinds.flow.formulation import (
    VALUE_RANGE,
    flow_denoiser,
    make_flow_scheduler,
    sample_flow,
    sampling_scheduler,
)
from diffusion.kinds.flow.method import FlowMethod
from diffusion.kinds.registry import Knob, NullCondition, Sampler, SamplerChoice, register
from diffusion.networks import Backbone
from diffusion.sampling import Draw, decoding, on_device

SHIFT = Knob(
    "shift", None, "time shift s of the sampler's levels, t' = s t / (1 + (s - 1) t)", 1e-3, 1e3
)
CHURN = Knob("churn", 0.0, "stochasticity S_churn (Karras et al. 2022; 0: deterministic)")
ETA = Knob("eta", 1.0, "the ancestral step's noise scale (0: Euler; 1: the reverse SDE)", 0, 1)
# name -> (the sampler's spec, the shared sampler it runs)
SAMPLERS = {
    "euler": (Sampler("euler", 50, (SHIFT, CHURN), "Euler (N evaluations)"), "euler"),
    "heun": (Sampler("heun", 25, (SHIFT, CHURN), "Heun (2N - 1 evaluations)"), "heun"),
    "dpm++2m": (Sampler("dpm++2m", 20, (SHIFT,), "DPM-Solver++(2M)"), "dpm++2m"),
    "euler-ancestral": (
        Sampler("euler-ancestral", 50, (SHIFT, ETA), "stochastic: the reverse SDE's steps"),
        "euler-ancestral",
    ),
}


class FlowKind:
    name = "flow"
    summary = "predict the velocity of the straight path from image to noise (rectified flow)"
    trained_by = "train_ddpm.py"
    value_range = VALUE_RANGE
    samplers = {name: spec for name, (spec, _) in SAMPLERS.items()}
    default_sampler = "euler"
    options = options.FlowOptions

    def check_options(self, cfg: Any) -> None:
        options.check_options(cfg)

    def leave_unused(self, cfg: Any) -> None:
        options.leave_unused(cfg)

    def take_from_model(self, cfg: Any, scheduler_config: Mapping[str, Any], source: str) -> None:
        options.take_from_model(cfg, scheduler_config, source)

    def resolve(
        self,
        cfg: Any,
        checkpoint_state: Mapping[str, Any] | None,
        data_std: float,
        data_shape: tuple[int, int, int],
    ) -> None:
        options.resolve(cfg, data_shape)

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
        scheduler = sampling_scheduler(scheduler_config or {}, choice.knobs.get("shift"))
        steps = scheduler.config.num_train_timesteps
        method = SAMPLERS[choice.name][1]

        def draw(indices, condition, every):
            condition = on_device(condition, device)
            data_range = VALUE_RANGE if codec is None else None  # latents: no projection
            denoiser = flow_denoiser(
                net, steps, condition, None if condition is None else null(len(indices), device),
                guidance_scale, dtype, data_range,
                guidance_interval=guidance_interval, compile=compile,
            )  # fmt: skip
            return sample_flow(
                denoiser, scheduler, shape, indices, seed, choice.steps, method,
                churn=choice.knob("churn"), eta=choice.knob("eta", 1.0), device=device,
                progression_every=every, clamp=codec is None,
            )  # fmt: skip

        return decoding(draw, codec, device)

    def train_scheduler(self, cfg: Any) -> FlowMatchEulerDiscreteScheduler:
        """The export's scheduler: diffusers' flow-matching one with the run's time shift."""
        return make_flow_scheduler(float(cfg.time_shift))

    def method(
        self,
        run: Any,
        scheduler: FlowMatchEulerDiscreteScheduler,
        backbone: Backbone,
        codec: LatentCodec | None,
    ) -> FlowMethod:
        return FlowMethod(self, run, scheduler, backbone, codec)


FLOW = register(FlowKind())
