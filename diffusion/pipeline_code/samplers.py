"""Samplers written once over a denoiser, for every kind whose noise fits a path.

A kind's model is a denoiser D(x, s) -> the clean estimate at noise level s, where its noisy
data is x = alpha(s) y + sigma(s) n along the kind's `NoisePath` (k-diffusion's pattern:
`sample_euler(model, x, sigmas)`). Two paths cover the kinds here:
- variance exploding (EDM): alpha = 1, sigma = s;
- the linear interpolant of rectified flow: alpha = 1 - s, sigma = s, s in [0, 1].
On both the probability-flow ODE is dx/ds = (x - D(x, s)) / s (EDM's eq. 3; for the
linear path that is the velocity eps - y), so the ODE samplers below take the same steps for
both; only adding noise (churn, ancestral steps) reads alpha and sigma.

Each sampler takes the levels s_0 > ... > s_N = 0, starts from x = sigma(s_0) * noise (the
linear path at s = 1 is pure noise) and returns (x at s_N, progression): CPU copies of x
scaled to unit variance every `progression_every` steps. `generator` is a list of one
generator per image (or one generator): each image's fresh noise comes from its own stream,
so an image does not depend on its batch.

This file is shipped inside exports with `core.py` (torch and diffusers only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, level of shape ())
Generators = torch.Generator | list[torch.Generator] | None


@dataclass(frozen=True)
class NoisePath:
    """x = alpha(s) y + sigma(s) n: the signal and noise scales of noise level s."""

    alpha: Callable[[float], float]
    sigma: Callable[[float], float]

    def renoise_coefficients(self, s: float, s_up: float) -> tuple[float, float]:
        """(a, b): x at level s_up = a x_s + b n, fresh noise n, for s_up >= s."""
        ratio = self.alpha(s_up) / self.alpha(s)
        return ratio, math.sqrt(max(self.sigma(s_up) ** 2 - (ratio * self.sigma(s)) ** 2, 0.0))

    def std(self, s: float) -> float:
        """The standard deviation of x at level s for unit-variance data (the progression shows
        x divided by it)."""
        return math.sqrt(self.alpha(s) ** 2 + self.sigma(s) ** 2)

    def log_snr(self, s: float) -> float:
        """lambda = log(alpha / sigma); -inf where alpha is 0, inf where sigma is 0."""
        alpha, sigma = self.alpha(s), self.sigma(s)
        if alpha == 0:
            return -math.inf
        return math.inf if sigma == 0 else math.log(alpha / sigma)


VARIANCE_EXPLODING = NoisePath(alpha=lambda s: 1.0, sigma=lambda s: s)


def _levels(levels: torch.Tensor | Sequence[float]) -> list[float]:
    values = [float(s) for s in levels]
    if len(values) < 2 or values[-1] != 0 or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"the noise levels must decrease to a final 0; got {values}")
    return values


def _start(noise: torch.Tensor, path: NoisePath, level: float) -> torch.Tensor:
    return noise.float() * path.sigma(level)


def _keep(progression: list, every: int | None, i: int, x: torch.Tensor, std: float) -> None:
    if every is not None and (i + 1) % every == 0:
        progression.append((x / std).cpu())


def sample_heun(
    denoiser: Denoiser,
    noise: torch.Tensor,
    levels: torch.Tensor | Sequence[float],
    path: NoisePath = VARIANCE_EXPLODING,
    second_order: bool = True,
    churn: float = 0.0,
    churn_range: tuple[float, float] = (0.0, math.inf),
    churn_noise_scale: float = 1.0,
    generator: Generators = None,
    progression_every: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EDM's Algorithm 2 on any path: Euler steps along dx/ds = (x - D) / s, with Heun's
    correction on every step but the last (`second_order`: 2N - 1 network evaluations for N
    steps), else Euler (N; deterministic Euler is DDIM with eta 0 on any path).

    churn > 0 is EDM's stochastic sampler: before step i the level is raised to s_hat = (1 +
    gamma) s_i, gamma = min(churn / N, sqrt(2) - 1), for s_i in `churn_range`, by adding fresh
    noise (`NoisePath.renoise_coefficients`; on the linear path s_hat stays at most 1).
    """
    values = _levels(levels)
    num_steps = len(values) - 1
    x = _start(noise, path, values[0])
    progression: list[torch.Tensor] = []
    for i, (s, s_next) in enumerate(zip(values[:-1], values[1:])):
        # Churn: raise the level to s_hat with fresh noise (gamma = 0: deterministic).
        low, high = churn_range
        gamma = min(churn / num_steps, math.sqrt(2) - 1) if low <= s <= high else 0.0
        s_hat = s * (1 + gamma)
        if path.alpha(s_hat) <= 0:  # the linear path ends at s = 1: no noisier level
            s_hat = s
        if s_hat > s:
            ratio, scale = path.renoise_coefficients(s, s_hat)
            fresh = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (x if ratio == 1 else ratio * x) + scale * churn_noise_scale * fresh
        # Euler step along dx/ds = (x - D(x; s)) / s.
        slope = (x - denoiser(x, torch.tensor(s_hat))) / s_hat
        x_next = x + (s_next - s_hat) * slope
        # Heun: average the slopes at both ends (not at s = 0, where D is the answer).
        if second_order and s_next > 0:
            slope_next = (x_next - denoiser(x_next, torch.tensor(s_next))) / s_next
            x_next = x + (s_next - s_hat) * (slope + slope_next) / 2
        x = x_next
        _keep(progression, progression_every, i, x, path.std(s_next))
    return x, progression


def sample_dpmpp_2m(
    denoiser: Denoiser,
    noise: torch.Tensor,
    levels: torch.Tensor | Sequence[float],
    path: NoisePath = VARIANCE_EXPLODING,
    generator: Generators = None,
    progression_every: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """DPM-Solver++(2M) (Lu et al. 2022), one network evaluation per step: the exact solution
    of the ODE in log-SNR lambda with the clean estimate extrapolated linearly from the last
    two steps; first order on the first step and on the last two (diffusers'
    `lower_order_final`: there lambda jumps, and extrapolating across the jump from a much
    shorter step multiplied the error ~6x on Gaussian data with a flow model's levels)."""
    values = _levels(levels)
    num_steps = len(values) - 1
    x = _start(noise, path, values[0])
    progression: list[torch.Tensor] = []
    previous, h_previous = None, None
    for i, (s, s_next) in enumerate(zip(values[:-1], values[1:])):
        denoised = denoiser(x, torch.tensor(s))
        alpha_next, sigma_next, sigma = path.alpha(s_next), path.sigma(s_next), path.sigma(s)
        h = path.log_snr(s_next) - path.log_snr(s)
        estimate = denoised
        second_order = previous is not None and i < num_steps - 2
        if second_order and math.isfinite(h) and math.isfinite(h_previous):
            r = h_previous / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        # x' = (sigma' / sigma) x + (alpha' - sigma' alpha / sigma) D: exp(-h) = sigma' alpha /
        # (sigma alpha'), written without it so that alpha = 0 (the linear path's start) and
        # sigma' = 0 (the end) need no infinities.
        x = (sigma_next / sigma) * x + (alpha_next - sigma_next * path.alpha(s) / sigma) * estimate
        previous, h_previous = denoised, h
        _keep(progression, progression_every, i, x, path.std(s_next))
    return x, progression


def sample_ancestral(
    denoiser: Denoiser,
    noise: torch.Tensor,
    levels: torch.Tensor | Sequence[float],
    path: NoisePath = VARIANCE_EXPLODING,
    eta: float = 1.0,
    generator: Generators = None,
    progression_every: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """DDIM's step with noise scale eta on any path (Song et al. 2021): x' = alpha' D +
    sqrt(sigma'^2 - c^2) eps_hat + c n, eps_hat = (x - alpha D) / sigma, c = eta sigma'
    sqrt(1 - exp(-2 h)). eta 0 is the deterministic Euler step; eta 1 draws each step from the
    model's posterior, the discretised reverse SDE (DDPM's sampler; SiT's SDE sampler on the
    linear path)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    values = _levels(levels)
    x = _start(noise, path, values[0])
    progression: list[torch.Tensor] = []
    for i, (s, s_next) in enumerate(zip(values[:-1], values[1:])):
        denoised = denoiser(x, torch.tensor(s))
        alpha, sigma = path.alpha(s), path.sigma(s)
        alpha_next, sigma_next = path.alpha(s_next), path.sigma(s_next)
        decay = 0.0 if alpha_next == 0 else (sigma_next * alpha) / (sigma * alpha_next)  # e^-h
        c = min(eta * sigma_next * math.sqrt(max(1 - decay**2, 0.0)), sigma_next)
        eps_hat = (x - alpha * denoised) / sigma
        x = alpha_next * denoised + math.sqrt(sigma_next**2 - c**2) * eps_hat
        if c > 0:
            x = x + c * randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        _keep(progression, progression_every, i, x, path.std(s_next))
    return x, progression


# The samplers by the name a kind's sampler maps to (k-diffusion's names where they exist).
METHODS = ("heun", "euler", "dpm++2m", "euler-ancestral")


def sample_with(
    method: str,
    denoiser: Denoiser,
    noise: torch.Tensor,
    levels: torch.Tensor | Sequence[float],
    path: NoisePath = VARIANCE_EXPLODING,
    *,
    churn: float = 0.0,
    eta: float = 1.0,
    generator: Generators = None,
    progression_every: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run sampler `method` (one of METHODS) with its knobs: churn for heun and euler, eta for
    euler-ancestral."""
    common = {"generator": generator, "progression_every": progression_every}
    if method in ("heun", "euler"):
        return sample_heun(denoiser, noise, levels, path, method == "heun", churn, **common)
    if method == "dpm++2m":
        return sample_dpmpp_2m(denoiser, noise, levels, path, **common)
    if method == "euler-ancestral":
        return sample_ancestral(denoiser, noise, levels, path, eta, **common)
    raise ValueError(f"unknown sampler {method!r}; expected one of {', '.join(METHODS)}")
