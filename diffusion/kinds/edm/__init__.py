"""EDM (Karras et al. 2022): the preconditioned denoiser D(x; sigma) around any backbone,
trained on log-normal noise levels and sampled over rho-spaced noise levels by the samplers
written once over a denoiser (Heun, Euler, DPM-Solver++(2M), ancestral).

    formulation.py  the loss, the noise-level distribution, the guided denoiser, sampling
    options.py      its config section, checks, and what a fine-tune takes from a model
    method.py       the training method: loss, pictures, model card, export
    pipeline.py     the preconditioning, the noise levels, EDMPipeline: shipped in exports
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import EDMEulerScheduler
from torch import nn

from diffusion.codecs import LatentCodec
from diffusion.kinds.edm import options
from diffusion.kinds.edm.formulation import (
    VALUE_RANGE,
    edm_denoiser,
    make_edm_scheduler,
    sample_edm,
)
from diffusion.kinds.edm.method import EDMMethod
from diffusion.kinds.registry import Knob, NullCondition, Sampler, SamplerChoice, register
from diffusion.networks import Backbone
from diffusion.sampling import Draw, decoding, on_device

CHURN = Knob("churn", 0.0, "stochasticity S_churn (Karras et al. 2022; 0: deterministic)")
ANCESTRAL_ETA = Knob("eta", 1.0, "the ancestral step's noise scale (0: Euler)", 0.0, 1.0)
# name -> (the sampler's spec, the shared sampler it runs)
SAMPLERS = {
    "edm-heun": (Sampler("edm-heun", 18, (CHURN,), "Heun (2N - 1 evaluations)"), "heun"),
    "edm-euler": (Sampler("edm-euler", 35, (CHURN,), "Euler"), "euler"),
    "dpm++2m": (Sampler("dpm++2m", 20, (), "DPM-Solver++(2M)"), "dpm++2m"),
    "euler-ancestral": (Sampler("euler-ancestral", 35, (ANCESTRAL_ETA,)), "euler-ancestral"),
}


class EDMKind:
    name = "edm"
    summary = "the preconditioned denoiser on log-normal noise levels (Karras et al. 2022)"
    trained_by = "train_ddpm.py"
    value_range = VALUE_RANGE
    samplers = {name: spec for name, (spec, _) in SAMPLERS.items()}
    default_sampler = "edm-heun"
    options = options.EDMOptions

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
        options.resolve(cfg, checkpoint_state, data_std)

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
        config = dict(scheduler_config or {})
        sigma_data = float(config["sigma_data"])
        method = SAMPLERS[choice.name][1]

        def draw(indices, condition, every):
            condition = on_device(condition, device)
            data_range = VALUE_RANGE if codec is None else None  # latents: no projection
            denoiser = edm_denoiser(
                net, sigma_data, condition,
                None if condition is None else null(len(indices), device),
                guidance_scale, dtype, data_range,
                guidance_interval=guidance_interval, compile=compile,
            )  # fmt: skip
            return sample_edm(
                denoiser, config, shape, indices, seed, choice.steps, method,
                churn=choice.knob("churn"), eta=choice.knob("eta", 1.0), device=device,
                progression_every=every, clamp=codec is None,
            )  # fmt: skip

        return decoding(draw, codec, device)

    def train_scheduler(self, cfg: Any) -> EDMEulerScheduler:
        """The export's scheduler: its config carries the EDM constants the sampler needs."""
        return make_edm_scheduler(cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, cfg.rho)

    def method(
        self, run: Any, scheduler: EDMEulerScheduler, backbone: Backbone, codec: LatentCodec | None
    ) -> EDMMethod:
        return EDMMethod(self, run, scheduler, backbone, codec)


EDM = register(EDMKind())
