"""DDPM training math: noise schedule, regression target, min-SNR-weighted loss.

Notation follows Ho et al. 2020: alpha_bar_t = prod_{s<=t} (1 - beta_s), and the forward
process (DDPM eq. 4) x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffusion.networks import predict
from diffusion.pipeline_code.core import Condition

VALUE_RANGE = (-1.0, 1.0)  # images are normalised to [-1, 1], the range of the Gaussian noise
# squaredcos_cap_v2: Nichol & Dhariwal 2021's cosine; linear: DDPM's betas from beta_start to
# beta_end; scaled_linear: Stable Diffusion's, linear in sqrt(beta) (0.00085 to 0.012).
BetaSchedule = Literal["squaredcos_cap_v2", "linear", "scaled_linear"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES = typing.get_args(PredictionType)


# The noise schedule a new model is trained with (the defaults of make_train_scheduler); the
# end points are diffusers' (DDPM's), which the cosine schedule does not read.
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "prediction_type": "v_prediction",
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
}


def make_train_scheduler(
    beta_schedule: BetaSchedule = "squaredcos_cap_v2",
    num_train_timesteps: int = 1000,
    prediction_type: PredictionType = "v_prediction",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> DDPMScheduler:
    """The noise schedule used in training; samplers are later built from its config.

    The default is the cosine schedule of Nichol & Dhariwal 2021, which destroys information
    more evenly than DDPM's linear betas at small resolutions, with v-prediction (Salimans &
    Ho 2022): on the default digits run it matches epsilon-prediction with DDPM-1000 and
    stochastic DDIM, and halves the FID of the deterministic samplers (BENCHMARKS.md, "Quality
    per sampling step"): near t = T the cosine schedule's alpha_bar is ~1e-9, where an epsilon
    network's x0 estimate amplifies its error ~1e4 times and v's does not. `beta_start` and
    `beta_end` are the linear schedules' end points (a fine-tuned Stable Diffusion keeps its
    scaled_linear 0.00085..0.012).
    """
    if num_train_timesteps < 2:
        raise ValueError(f"the number of timesteps must be >= 2; got {num_train_timesteps}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        beta_start=beta_start,
        beta_end=beta_end,
    )


@dataclass(frozen=True)
class NoiseTables:
    """A DDPM schedule's per-timestep tables, on the training device, built once at setup.

    Everything the loss looks up by timestep lives here, so a training step moves nothing
    between host and device (a host-to-device copy inside the step makes a GPU wait).
    Values are those diffusers' `add_noise`/`get_velocity` compute, op for op: sqrt of the
    float32 alpha_bar table.
    """

    prediction_type: str
    sqrt_alpha_bar: torch.Tensor  # (T,) float32
    sqrt_one_minus_alpha_bar: torch.Tensor  # (T,) float32
    snr: torch.Tensor  # (T,) float32: alpha_bar / (1 - alpha_bar), computed in float64

    @classmethod
    def build(cls, scheduler: DDPMScheduler, device: torch.device | str) -> NoiseTables:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}"
            )
        alpha_bar = scheduler.alphas_cumprod.float()
        # SNR in float64 from the betas: in float32, 1 - alpha_bar_t at small t (~4e-5) keeps
        # only ~3 significant digits. Stored as float32: not every accelerator has float64.
        alpha_bar64 = torch.cumprod(1 - scheduler.betas.double(), dim=0)
        return cls(
            prediction_type,
            (alpha_bar**0.5).to(device),
            ((1 - alpha_bar) ** 0.5).to(device),
            (alpha_bar64 / (1 - alpha_bar64)).float().to(device),
        )

    @property
    def num_timesteps(self) -> int:
        return self.snr.shape[0]

    def _column(self, table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor):
        return table[timesteps].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """DDPM eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
        return (
            self._column(self.sqrt_alpha_bar, timesteps, x0) * x0
            + self._column(self.sqrt_one_minus_alpha_bar, timesteps, x0) * noise
        )

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the network regresses onto, per the prediction type.

        epsilon: eps (DDPM eq. 14); sample: x0;
        v_prediction: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022).
        """
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return (
            self._column(self.sqrt_alpha_bar, timesteps, x0) * noise
            - self._column(self.sqrt_one_minus_alpha_bar, timesteps, x0) * x0
        )

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023), shape (B,).

        Clamping SNR at gamma stops the nearly-clean timesteps, whose loss is easy and large in
        x0 terms, from dominating training. The paper's x0-space weight min(SNR, gamma) is
        converted to the space the network predicts in:
          sample: min(SNR, gamma); epsilon: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1).
        """
        if gamma <= 0:
            raise ValueError(f"min-SNR gamma must be > 0; got {gamma}")
        ratio = self.snr[timesteps]
        clamped = ratio.clamp(max=gamma)
        if self.prediction_type == "epsilon":
            return clamped / ratio
        if self.prediction_type == "v_prediction":
            return clamped / (ratio + 1)
        return clamped


def diffusion_loss(
    model: torch.nn.Module,
    tables: NoiseTables,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    min_snr_gamma: float | None,
    condition: Condition | None = None,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM Algorithm 1's loss: MSE between the network output at x_t and the target.

    Returns (loss, per_sample): the (optionally min-SNR-weighted) mean to backpropagate, and the
    detached unweighted per-sample MSE, shape (B,), for logging loss by timestep. The MSE is
    taken in float32 even if the model ran in bf16/fp16. `sample_weights` (B,) weight each
    sample's term of the mean (DreamBooth's prior term). No host syncs and no host-to-device
    copies: `tables` and every input are on x0's device.
    """
    noisy = tables.add_noise(x0, noise, timesteps)
    output = predict(model, noisy, timesteps, condition)
    target = tables.target(x0, noise, timesteps)
    per_sample = F.mse_loss(output.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    weighted = per_sample
    if min_snr_gamma is not None:
        weighted = tables.min_snr_weights(timesteps, min_snr_gamma) * weighted
    if sample_weights is not None:
        weighted = sample_weights * weighted
    return weighted.mean(), per_sample.detach()
