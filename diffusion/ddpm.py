"""DDPM training math: noise schedule, regression target, min-SNR-weighted loss.

Notation follows Ho et al. 2020: alpha_bar_t = prod_{s<=t} (1 - beta_s), and the forward
process (DDPM eq. 4) x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I).
"""

from __future__ import annotations

import typing
import weakref
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffusion.models import predict

VALUE_RANGE = (-1.0, 1.0)  # images are normalised to [-1, 1], the range of the Gaussian noise
BetaSchedule = Literal["squaredcos_cap_v2", "linear"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES = typing.get_args(PredictionType)


# The noise schedule a new model is trained with (the defaults of make_train_scheduler).
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "prediction_type": "v_prediction",
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
}


def make_train_scheduler(
    beta_schedule: BetaSchedule = "squaredcos_cap_v2",
    num_train_timesteps: int = 1000,
    prediction_type: PredictionType = "v_prediction",
) -> DDPMScheduler:
    """The noise schedule used in training; samplers are later built from its config.

    The default is the cosine schedule of Nichol & Dhariwal 2021, which destroys information
    more evenly than DDPM's linear betas at small resolutions, with v-prediction (Salimans &
    Ho 2022): on the default digits run it matches epsilon-prediction with DDPM-1000 and
    stochastic DDIM, and halves the FID of the deterministic samplers (README, "Quality per
    sampling step"): near t = T the cosine schedule's alpha_bar is ~1e-9, where an epsilon
    network's x0 estimate amplifies its error ~1e4 times and v's does not.
    """
    if num_train_timesteps < 2:
        raise ValueError(f"the number of timesteps must be >= 2; got {num_train_timesteps}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
    )


def alphas_cumprod_on(scheduler: DDPMScheduler, device: torch.device) -> torch.Tensor:
    """alpha_bar_t table on `device`, moved once and cached on the scheduler.

    Same caching diffusers' own `add_noise` does (it reassigns `scheduler.alphas_cumprod`), so
    both share a single device copy and later calls are a no-op `.to()`.
    """
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    return scheduler.alphas_cumprod


def training_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network regresses onto, per the scheduler's prediction_type.

    epsilon: eps (DDPM eq. 14); sample: x0;
    v_prediction: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, sec. 4).
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")


# scheduler -> {device: SNR table}; weak keys so dropped schedulers free their tables.
_SNR_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _snr_table(scheduler: DDPMScheduler, device: torch.device) -> torch.Tensor:
    """SNR(t) for every t, built once per scheduler and device.

    Computed in float64 from the betas: in float32, 1 - alpha_bar_t at small t (~4e-5) keeps
    only ~3 significant digits. Stored as float32 because not every accelerator has float64.
    """
    per_device = _SNR_TABLES.setdefault(scheduler, {})
    if device not in per_device:
        alpha_bar = torch.cumprod(1 - scheduler.betas.double(), dim=0)
        per_device[device] = (alpha_bar / (1 - alpha_bar)).float().to(device)
    return per_device[device]


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t), shape (B,), float32."""
    return _snr_table(scheduler, timesteps.device)[timesteps]


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), shape (B,).

    Clamping SNR at gamma stops the nearly-clean timesteps, whose loss is easy and large in x0
    terms, from dominating training. The paper's x0-space weight min(SNR, gamma) is converted
    to the space the network predicts in:
      sample: min(SNR, gamma); epsilon: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1).
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0; got {gamma}")
    ratio = snr(scheduler, timesteps)
    clamped = ratio.clamp(max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clamped / ratio
    if prediction_type == "v_prediction":
        return clamped / (ratio + 1)
    if prediction_type == "sample":
        return clamped
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    min_snr_gamma: float | None,
    class_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM Algorithm 1's loss: MSE between the network output at x_t and the target.

    Returns (loss, per_sample): the (optionally min-SNR-weighted) mean to backpropagate, and the
    detached unweighted per-sample MSE, shape (B,), for logging loss by timestep. The MSE is
    taken in float32 even if the model ran in bf16/fp16. No host syncs: everything stays on
    x0's device, so the caller decides when to read values.
    """
    # DDPM eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
    timesteps = timesteps.to(x0.device)  # no-op in the intended use; avoids table ping-pong
    alphas_cumprod_on(scheduler, x0.device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    output = predict(model, noisy, timesteps, class_labels)
    target = training_target(scheduler, x0, noise, timesteps)
    per_sample = F.mse_loss(output.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    if min_snr_gamma is None:
        loss = per_sample.mean()
    else:
        loss = (min_snr_weights(scheduler, timesteps, min_snr_gamma) * per_sample).mean()
    return loss, per_sample.detach()
