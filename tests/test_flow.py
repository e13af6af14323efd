"""Rectified flow's math against exact answers: Gaussian data, whose optimal velocity field and
ODE are known in closed form, and diffusers' FlowMatchEulerDiscreteScheduler step for step.

For x_0 ~ N(mu, diag(lam)) and x_t = (1 - t) x_0 + t n, E[x_0 | x_t] = mu + (1 - t) lam /
((1 - t)^2 lam + t^2) (x_t - (1 - t) mu) per coordinate, and the probability-flow ODE maps the
noise z at t = 1 to x_0 = mu + sqrt(lam) z (each coordinate's marginal stays Gaussian and the
map is monotone): every sampler's output is checked against that, sample by sample.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from diffusion.kinds.flow.formulation import (
    flow_denoiser,
    flow_loss,
    make_flow_scheduler,
    sample_flow,
    sample_times,
    shift_times,
)
from diffusion.kinds.flow.pipeline import LINEAR, flow_levels
from diffusion.pipeline_code.samplers import sample_with
from diffusion.sampling import make_sample_generators

MU = torch.tensor([0.3, -0.5, 0.0, 0.8], dtype=torch.float64).view(1, 1, 2, 2)
LAM = torch.tensor([0.25, 1.0, 0.04, 2.25], dtype=torch.float64).view(1, 1, 2, 2)


def exact_denoiser(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """E[x_0 | x_t] for the Gaussian data, in float64, returned as x's dtype."""
    t = float(t)
    x64 = x.double()
    gain = (1 - t) * LAM / ((1 - t) ** 2 * LAM + t**2)
    return (MU + gain * (x64 - (1 - t) * MU)).to(x.dtype)


def exact_solution(noise: torch.Tensor) -> torch.Tensor:
    return (MU + LAM.sqrt() * noise.double()).float()


class ExactVelocityNetwork(nn.Module):
    """A "UNet" whose output is the exact velocity (x_t - D) / t at timestep 1000 t, through
    the toolkit's network call (the config is a UNet's, read for the sample shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"sample_size": 2, "in_channels": 1})()
        self.calls = 0

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False):
        self.calls += 1
        t = timestep.double()[0].item() / 1000
        return (((x.double() - exact_denoiser(x, t).double()) / t).float(),)


@pytest.mark.parametrize(("method", "order"), [("heun", 2), ("euler", 1)])
def test_ode_samplers_converge_to_the_exact_map_at_their_order(method: str, order: int) -> None:
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = exact_solution(noise)
    errors = []
    for num_steps in (8, 16, 32, 64):
        levels = flow_levels(make_flow_scheduler(), num_steps, method)
        x, _ = sample_with(method, exact_denoiser, noise, levels, LINEAR)
        errors.append((x - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(2**order * 0.7 < r < 2**order * 1.6 for r in ratios[1:]), (errors, ratios)
    # Heun's last step, to t = 0, is Euler's (EDM's Algorithm 2): it bounds the error at 64
    assert errors[-1] < (2.5e-3 if order == 2 else 0.15), errors


def test_heun_does_not_read_the_velocity_at_the_schedulers_last_level() -> None:
    """A network whose velocity is wrong near t = 0 (where logit-normal training hardly
    reaches) leaves Heun's output as good as with the exact one; the scheduler's own levels
    end at 1/T, where Heun's correction would take that velocity at full weight."""

    def untrained_near_zero(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        # D = x - t v with v off by 3 (a velocity as large as the noise) below t = 0.01
        return exact_denoiser(x, t) - (3 * float(t) if float(t) < 0.01 else 0.0)

    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    exact = exact_solution(noise)
    levels = flow_levels(make_flow_scheduler(), 10, "heun")
    assert len(levels) == 11 and levels[-1] == 0 and levels[-2] > 0.05, levels
    x, _ = sample_with("heun", untrained_near_zero, noise, levels, LINEAR)
    x_exact, _ = sample_with("heun", exact_denoiser, noise, levels, LINEAR)
    assert (x - x_exact).abs().max() < 1e-6
    euler_levels = flow_levels(make_flow_scheduler(), 10)  # the scheduler's: ... 0.112, 1/T, 0
    x, _ = sample_with("heun", untrained_near_zero, noise, euler_levels, LINEAR)
    assert (x - exact).abs().max() > 0.1  # what the fix avoids


def test_dpm_solver_beats_euler_at_the_same_evaluations() -> None:
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    exact = exact_solution(noise)
    levels = flow_levels(make_flow_scheduler(), 10)
    errors = {
        method: (sample_with(method, exact_denoiser, noise, levels, LINEAR)[0] - exact).abs().max()
        for method in ("euler", "dpm++2m")
    }
    assert errors["dpm++2m"] < errors["euler"] / 5, errors


@pytest.mark.parametrize(("method", "knobs"), [("euler-ancestral", {"eta": 1.0}),
                                               ("heun", {"churn": 20.0})])  # fmt: skip
def test_stochastic_samplers_draw_the_data_distribution(method: str, knobs: dict) -> None:
    """Mean and variance of 6000 samples (per coordinate) match the data's within a few
    standard errors; the stochastic samplers do not follow the ODE sample by sample."""
    num = 6000
    noise = torch.randn(num, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    levels = flow_levels(make_flow_scheduler(), 400)
    generator = torch.Generator().manual_seed(4)
    x, _ = sample_with(method, exact_denoiser, noise, levels, LINEAR, generator=generator,
                       **knobs)  # fmt: skip
    mean, var = x.double().mean(0, keepdim=True), x.double().var(0, keepdim=True)
    assert ((mean - MU).abs() < 4 * (LAM / num).sqrt()).all(), (mean, MU)
    assert ((var / LAM - 1).abs() < 4 * math.sqrt(2 / num) + 0.02).all(), (var, LAM)
    assert (x - exact_solution(noise)).abs().mean() > 0.05  # not the ODE's map


def test_the_toolkits_sampler_through_a_network_reaches_the_exact_answer() -> None:
    """sample_flow -> flow_denoiser -> the network call (timestep 1000 t) -> the samples of
    sample.py's seeds: each one at mu + sqrt(lam) z of its own seed's noise."""
    net = ExactVelocityNetwork()
    scheduler = make_flow_scheduler()
    images, _ = sample_flow(flow_denoiser(net), scheduler, (1, 2, 2), range(5), 3, 40, "heun",
                            clamp=False)  # fmt: skip
    generators = make_sample_generators(3, range(5))
    noise = torch.cat([torch.randn(1, 1, 2, 2, generator=g) for g in generators])
    torch.testing.assert_close(images, exact_solution(noise), atol=2e-3, rtol=0)
    assert net.calls == 2 * 40 - 1  # Heun: two evaluations a step but the last


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_diffusers_flow_match_euler_step_for_step(shift: float) -> None:
    """The velocity network run by diffusers' own scheduler loop and by the toolkit's Euler over
    the same levels: the same x after every step (float rounding apart)."""
    net = ExactVelocityNetwork()
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(12)
    x, theirs = noise.clone(), []
    for t in scheduler.timesteps:
        velocity = net(x, t.expand(len(x)))[0]
        x = scheduler.step(velocity, t, x).prev_sample
        theirs.append(x)
    levels = flow_levels(make_flow_scheduler(shift), 12)
    assert torch.equal(levels.float(), scheduler.sigmas)
    ours, progression = sample_with("euler", flow_denoiser(net), noise, levels, LINEAR,
                                    progression_every=1)  # fmt: skip
    for i, (step, level) in enumerate(zip(progression, levels[1:].tolist())):
        std = math.sqrt((1 - level) ** 2 + level**2)
        torch.testing.assert_close(step * std, theirs[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, theirs[-1], atol=1e-5, rtol=1e-5)


def test_time_sampling_and_shift() -> None:
    generator = torch.Generator().manual_seed(0)
    logit_normal = sample_times(20000, "logit-normal", generator, 0.0, 1.0)
    assert 0 < logit_normal.min() and logit_normal.max() < 1
    assert abs(torch.logit(logit_normal).std().item() - 1.0) < 0.03
    assert abs(logit_normal.median().item() - 0.5) < 0.02
    moved = sample_times(20000, "logit-normal", generator, 1.0, 0.5)
    assert abs(torch.logit(moved).mean().item() - 1.0) < 0.03
    uniform = sample_times(20000, "uniform", generator)
    assert abs(uniform.mean().item() - 0.5) < 0.01
    mode = sample_times(20000, "mode", generator, mode_scale=1.29)
    assert 0 <= mode.min() and mode.max() <= 1
    # The mode density (SD3's eq. 20) puts more mass in the middle than uniform times.
    assert ((mode > 0.25) & (mode < 0.75)).float().mean() > 0.55
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    shifted = shift_times(t, 3.0)
    torch.testing.assert_close(shifted / (1 - shifted), 3 * t / (1 - t))  # sigma times 3
    assert torch.equal(shift_times(t, 1.0), t)
    # diffusers' scheduler shifts its levels toward high noise by the same rule.
    shifted_levels, plain = (
        flow_levels(make_flow_scheduler(3.0), 8),
        flow_levels(make_flow_scheduler(), 8),
    )
    assert shifted_levels[0] == plain[0] == 1 and shifted_levels[-1] == plain[-1] == 0
    assert (shifted_levels[1:-1] > plain[1:-1]).all()


class ConstantNetwork(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.seen.append(timestep)
        return torch.full_like(x, self.value)


def test_the_loss_regresses_the_velocity_at_the_interpolant() -> None:
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.1, 0.5, 0.9])
    net = ConstantNetwork(0.0)
    loss, per_sample = flow_loss(net, x0, t, noise)
    torch.testing.assert_close(per_sample, (noise - x0).square().mean(dim=(1, 2, 3)))
    torch.testing.assert_close(loss, per_sample.mean())
    torch.testing.assert_close(net.seen[0], t * 1000)
