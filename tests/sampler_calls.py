"""The samplers called on a network, as the kinds call them: the denoiser built around the
network, the sample shape read from it (tests that sample networks directly use these)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from diffusion.kinds.ddpm.samplers import network_denoiser, sample_ddpm
from diffusion.kinds.edm.formulation import edm_denoiser, sample_edm
from diffusion.networks import sample_shape
from diffusion.pipeline_code.core import class_condition, null_class


def classes(net: nn.Module, class_labels: torch.Tensor | None) -> tuple[Any, Any]:
    """(condition, its "no condition") of class ids for `net`, or (None, None)."""
    if class_labels is None:
        return None, None
    null = torch.full_like(class_labels, null_class(net))
    return class_condition(class_labels), class_condition(null)


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
    condition, null = classes(net, class_labels)
    denoiser = network_denoiser(net, condition, null, guidance_scale, dtype, scheduler=scheduler)
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
    condition, null = classes(net, class_labels)
    denoiser = edm_denoiser(
        net, float(scheduler_config["sigma_data"]), condition, null, guidance_scale, dtype
    )
    return sample_edm(
        denoiser, scheduler_config, shape or sample_shape(net), indices, seed, num_steps,
        "heun" if second_order else "euler", churn, device=device,
        progression_every=progression_every,
    )  # fmt: skip
