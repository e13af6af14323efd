"""EDM math against independent references: the paper's formulas in float64, diffusers' EDM
scheduler, and Gaussian data, whose exact denoiser and ODE solution are closed-form."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import EDMEulerScheduler, UNet2DModel
from sampler_calls import run_edm
from torch import nn

from diffusion.kinds.edm.formulation import (
    edm_loss,
    loss_weight,
    make_edm_scheduler,
    sample_noise_levels,
)
from diffusion.kinds.edm.pipeline import denoise, karras_sigmas, preconditioning
from diffusion.pipeline_code.core import class_condition
from diffusion.pipeline_code.samplers import sample_heun
from diffusion.sampling import make_sample_generators

SIGMA_DATA = 0.5


def reference_coefficients(sigma: torch.Tensor, sigma_data: float) -> dict[str, torch.Tensor]:
    """EDM Table 1, written out again in float64."""
    sigma = sigma.double()
    return {
        "c_skip": sigma_data**2 / (sigma**2 + sigma_data**2),
        "c_out": sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2),
        "c_in": 1 / torch.sqrt(sigma**2 + sigma_data**2),
        "c_noise": 0.25 * torch.log(sigma),
    }


def tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )


def test_preconditioning_matches_the_paper_and_diffusers() -> None:
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
    ours = dict(zip(("c_skip", "c_out", "c_in", "c_noise"), preconditioning(sigma, SIGMA_DATA)))
    for name, value in reference_coefficients(sigma, SIGMA_DATA).items():
        torch.testing.assert_close(ours[name], value, rtol=1e-12, atol=0, msg=name)
    # diffusers' EDM scheduler implements the same preconditioning independently.
    scheduler = make_edm_scheduler(SIGMA_DATA)
    x = torch.randn(len(sigma), 1, 2, 2, dtype=torch.float64)
    column = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(
        scheduler.precondition_inputs(x, column), ours["c_in"][:, None, None, None] * x
    )
    torch.testing.assert_close(scheduler.precondition_noise(sigma), ours["c_noise"])
    output = torch.randn_like(x)
    torch.testing.assert_close(
        scheduler.precondition_outputs(x, output, column),
        ours["c_skip"][:, None, None, None] * x + ours["c_out"][:, None, None, None] * output,
    )
    # The loss weight undoes c_out: lambda(sigma) c_out(sigma)^2 = 1.
    torch.testing.assert_close(
        loss_weight(sigma, SIGMA_DATA) * ours["c_out"] ** 2, torch.ones(6, dtype=torch.float64)
    )


def test_loss_equals_the_weighted_denoising_error_in_float64() -> None:
    """Ours (float32, regressing F onto the effective target) vs lambda(sigma) |D(y + sigma n) - y|^2
    computed from the paper's definitions in float64 with the same network."""
    net = tiny_unet()
    generator = torch.Generator().manual_seed(1)
    y = torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(y.shape, generator=generator)
    sigma = torch.tensor([0.002, 0.03, 0.3, 1.0, 5.0, 80.0])
    loss, per_sample = edm_loss(net, y, sigma, noise, SIGMA_DATA)

    ref = reference_coefficients(sigma, SIGMA_DATA)
    column = {k: v.reshape(-1, 1, 1, 1) for k, v in ref.items()}
    x = y.double() + sigma.double().reshape(-1, 1, 1, 1) * noise.double()
    f = copy.deepcopy(net).double()(column["c_in"] * x, ref["c_noise"]).sample
    denoised = column["c_skip"] * x + column["c_out"] * f
    weight = (sigma.double() ** 2 + SIGMA_DATA**2) / (sigma.double() * SIGMA_DATA) ** 2
    expected = weight * (denoised - y.double()).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample.double(), expected, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=2e-4, atol=1e-6)
    assert loss.requires_grad and not per_sample.requires_grad


def test_noise_levels_are_log_normal_and_seeded() -> None:
    sigma = sample_noise_levels(200_000, -1.2, 1.2, torch.Generator().manual_seed(0))
    log = sigma.log()
    assert log.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log.std().item() == pytest.approx(1.2, abs=0.01)
    again = sample_noise_levels(200_000, -1.2, 1.2, torch.Generator().manual_seed(0))
    assert torch.equal(sigma, again)


def test_karras_sigmas_match_diffusers_and_end_at_zero() -> None:
    sigmas = karras_sigmas(18, 0.002, 80.0, 7.0)
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    scheduler.set_timesteps(18)
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas.float(), rtol=1e-6, atol=0)
    assert len(sigmas) == 19 and sigmas[-1] == 0 and (sigmas[:-1].diff() < 0).all()
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        karras_sigmas(0, 0.002, 80.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(10, 1.0, 1.0)


# --------------------------------------------------------------------------- Gaussian data

MU, STD = 0.3, 0.4  # every pixel of the data is N(MU, STD^2), independently
SIGMA_MAX = 80.0


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[y | y + sigma n] for y ~ N(MU, STD^2): the exact D(x; sigma)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (STD**2 * x + sigma**2 * MU) / (STD**2 + sigma**2)


def exact_ode_solution(noise: torch.Tensor) -> torch.Tensor:
    """dx/dsigma = (x - D) / sigma = sigma (x - MU) / (STD^2 + sigma^2) from x = SIGMA_MAX n
    gives x(sigma) - MU = (x(SIGMA_MAX) - MU) sqrt((STD^2 + sigma^2) / (STD^2 + SIGMA_MAX^2))."""
    return MU + (SIGMA_MAX * noise - MU) * STD / math.sqrt(STD**2 + SIGMA_MAX**2)


@pytest.mark.parametrize(("second_order", "order"), [(True, 2), (False, 1)])
def test_sampler_converges_to_the_exact_ode_solution_at_its_order(
    second_order: bool, order: int
) -> None:
    noise = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = exact_ode_solution(noise)
    errors = []
    for num_steps in (16, 32, 64, 128):
        sigmas = karras_sigmas(num_steps, 0.002, SIGMA_MAX, 7.0)
        x, _ = sample_heun(gaussian_denoiser, noise, sigmas, second_order=second_order)
        errors.append((x - exact).abs().max().item())
    # Doubling the steps divides the error by about 2^order (Heun: 4, Euler: 2).
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(2**order * 0.85 < r < 2**order * 1.5 for r in ratios[1:]), (errors, ratios)
    if second_order:
        assert errors[-1] < 2e-3


class ExactNetwork(nn.Module):
    """A "UNet" whose F makes the preconditioned denoiser exactly the Gaussian one: it reads
    sigma back from c_noise and x from c_in x, with the float64 reference coefficients."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # a device and dtype for the samplers
        self.config = UNet2DModel(
            sample_size=2, in_channels=1, out_channels=1, block_out_channels=(8,),
            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
        ).config  # fmt: skip

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False):
        c_noise = timestep
        sigma = torch.exp(4 * c_noise.double())
        ref = reference_coefficients(sigma, SIGMA_DATA)
        column = {k: v.reshape(-1, 1, 1, 1) for k, v in ref.items()}
        x = x_in.double() / column["c_in"]
        target = gaussian_denoiser(x, sigma)
        return (((target - column["c_skip"] * x) / column["c_out"]).float(),)


def test_denoiser_and_seeded_sampler_reach_the_exact_solution_through_the_network() -> None:
    net = ExactNetwork()
    sigma = torch.tensor([0.01, 0.5, 20.0])
    x = torch.randn(3, 1, 2, 2)
    torch.testing.assert_close(
        denoise(net, x, sigma, SIGMA_DATA), gaussian_denoiser(x, sigma), rtol=1e-5, atol=1e-6
    )
    config = {"sigma_data": SIGMA_DATA, "sigma_min": 0.002, "sigma_max": SIGMA_MAX, "rho": 7.0}
    images, _ = run_edm(net, config, range(4), seed=3, num_steps=64, shape=(1, 2, 2))
    generators = make_sample_generators(3, range(4))
    noise = torch.cat([torch.randn(1, 1, 2, 2, generator=g) for g in generators])
    torch.testing.assert_close(images, exact_ode_solution(noise).clamp(-1, 1), atol=2e-3, rtol=0)


def test_churn_draws_each_images_noise_from_its_own_seed() -> None:
    """With churn, fresh noise enters at every step; image k's still comes from (seed, k) alone,
    so splitting the batch changes nothing (the exact network is elementwise: bit for bit)."""
    net = ExactNetwork()
    config = {"sigma_data": SIGMA_DATA, "sigma_min": 0.002, "sigma_max": SIGMA_MAX, "rho": 7.0}
    kwargs = {"seed": 5, "num_steps": 8, "churn": 10.0}
    together, _ = run_edm(net, config, range(6), **kwargs)
    split = [run_edm(net, config, part, **kwargs)[0] for part in (range(0, 2), range(2, 6))]
    assert torch.equal(together, torch.cat(split))
    deterministic, _ = run_edm(net, config, range(6), seed=5, num_steps=8)
    assert (together - deterministic).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="churn must be >= 0"):
        run_edm(net, config, range(2), seed=5, num_steps=8, churn=-1.0)


def test_denoise_passes_class_labels_to_a_class_conditional_unet() -> None:
    """The seam a class-conditional EDM uses: labels reach the UNet's class embedding (index C
    of C + 1 embeddings free for "no class", as classifier-free guidance needs)."""
    unet = tiny_unet(num_class_embeds=10 + 1)
    with torch.no_grad():
        unet.class_embedding.weight.normal_()
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.7, 0.7])
    three, null = class_condition(torch.tensor([3, 3])), class_condition(torch.tensor([10, 10]))
    digit = denoise(unet, x, sigma, SIGMA_DATA, three, null)
    no_class = denoise(unet, x, sigma, SIGMA_DATA, null, null)
    assert (digit - no_class).abs().mean() > 1e-3
    assert torch.equal(digit, denoise(unet, x, sigma, SIGMA_DATA, three, null))
