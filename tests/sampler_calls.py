"""The samplers called on a network, as the kinds call them: the denoiser built around the
network, the sample shape read from it (tests that sample networks directly use these)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from diffusion.edm import edm_denoiser, sample_edm
from diffusion.networks import sample_shape
from diffusion.sampling import network_denoiser, sample_ddpm


def run_ddpm(
    net: nn.Module,
    scheduler: Any,
    indices: Sequence[int],
    seed: int,
    num_inference_steps: int,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progression_every: int | None = None,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    denoiser = network_denoiser(net, class_labels, guidance_scale, dtype, scheduler=scheduler)
    return sample_ddpm(
        denoiser, scheduler, sample_shape(net), indices, seed, num_inference_steps, eta, device,
        progression_every,
    )  # fmt: skip


def run_edm(
    net: nn.Module,
    scheduler_config: Mapping[str, Any],
    indices: Sequence[int],
    seed: int,
    num_steps: int,
    second_order: bool = True,
    churn: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progression_every: int | None = None,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    shape: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    denoiser = edm_denoiser(
        net, float(scheduler_config["sigma_data"]), class_labels, guidance_scale, dtype
    )
    return sample_edm(
        denoiser, scheduler_config, shape or sample_shape(net), indices, seed, num_steps,
        second_order, churn, device, progression_every,
    )  # fmt: skip
