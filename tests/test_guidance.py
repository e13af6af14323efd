"""Classifier-free guidance's math (`pipelines.guide`): the plain combination wherever its clean
image is in range, the projection onto [-1, 1] elsewhere, the noise level of every DDPM
sampler's timesteps, w = 0 and 1 left exactly as the network's outputs, and the guidance
interval: w > 1 only at the middle noise levels, one conditional forward elsewhere."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, UNet2DModel

from ddp_utils.errors import InputError
from diffusion.conditioning.guidance import parse_guidance_interval
from diffusion.kinds.ddpm.formulation import make_train_scheduler
from diffusion.kinds.ddpm.pipeline import ddpm_coefficients, ddpm_sigma
from diffusion.kinds.ddpm.samplers import make_inference_scheduler, network_denoiser
from diffusion.kinds.edm.formulation import edm_denoiser
from diffusion.kinds.edm.pipeline import denoise
from diffusion.pipeline_code.core import class_condition as cls
from diffusion.pipeline_code.core import guidance_at, guide, guided_output, network_output


@pytest.fixture(scope="module")
def net() -> UNet2DModel:
    """A tiny class-conditional UNet (10 classes and the "no class" row) at 8x8."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, num_class_embeds=11,
    ).eval()  # fmt: skip


def test_guide_is_plain_cfg_where_the_clean_image_is_in_range_and_projects_it_elsewhere() -> None:
    generator = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(4, 1, 8, 8, generator=generator) for _ in range(3))
    c_skip, c_out = torch.tensor(0.8), torch.tensor(-0.6)  # v-prediction at alpha_bar = 0.64
    plain = uncond + 3.0 * (cond - uncond)
    guided = guide(cond, uncond, 3.0, x, c_skip, c_out)
    before, after = c_skip * x + c_out * plain, c_skip * x + c_out * guided
    inside = before.abs() <= 1
    assert 0.1 < inside.float().mean() < 0.9  # both cases occur
    assert torch.equal(guided[inside], plain[inside])  # bit for bit
    assert torch.allclose(after, before.clamp(-1, 1), atol=1e-6)
    assert after.abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_coefficients_give_the_clean_image_diffusers_computes(prediction_type: str) -> None:
    scheduler = DDIMScheduler.from_config(
        make_train_scheduler("squaredcos_cap_v2", 1000, prediction_type).config, clip_sample=False
    )
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x, output = (torch.randn(2, 1, 8, 8, generator=generator) for _ in range(2))
    for t in scheduler.timesteps:
        x0 = scheduler.step(output, t, x).pred_original_sample
        c_skip, c_out = ddpm_coefficients(scheduler, t)
        assert torch.allclose(c_skip * x + c_out * output, x0, rtol=1e-4, atol=1e-4), int(t)


def test_karras_samplers_fractional_timesteps_read_as_their_own_noise_levels() -> None:
    """Euler with Karras spacing feeds the network x / sqrt(sigma^2 + 1) at a fractional t;
    the clean image it computes from a v-prediction is the one ddpm_coefficients give."""
    config = make_train_scheduler("squaredcos_cap_v2", 1000, "v_prediction").config
    scheduler = make_inference_scheduler("euler-karras", config)
    assert isinstance(scheduler, EulerDiscreteScheduler)
    scheduler.set_timesteps(12)
    assert any(float(t) != round(float(t)) for t in scheduler.timesteps)
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps[:-1]:
        sample, output = (torch.randn(1, 1, 4, 4, generator=generator) for _ in range(2))
        x_t = scheduler.scale_model_input(sample, t)
        x0 = scheduler.step(output, t, sample).pred_original_sample
        c_skip, c_out = ddpm_coefficients(scheduler, t)
        assert torch.allclose(c_skip * x_t + c_out * output, x0, rtol=1e-3, atol=1e-3), float(t)


def test_ddim_steps_toward_the_clipped_image_it_computes_under_guidance() -> None:
    """DDIM clips the clean image to [-1, 1] but steps with the noise of the unclipped one: a
    guided output out of range used to land off both. With `guide`, its step is the step of
    a DDIM that takes the noise from the clipped image (use_clipped_model_output)."""
    config = make_train_scheduler("squaredcos_cap_v2", 1000, "v_prediction").config
    scheduler = make_inference_scheduler("ddim", config)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[3]  # high noise: where w = 3 put D out of range on the digits
    c_skip, c_out = ddpm_coefficients(scheduler, t)
    generator = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(2, 1, 8, 8, generator=generator) for _ in range(3))
    plain = uncond + 3.0 * (cond - uncond)
    assert (c_skip * x + c_out * plain).abs().max() > 1.5
    consistent = scheduler.step(plain, t, x, use_clipped_model_output=True).prev_sample
    broken = scheduler.step(plain, t, x).prev_sample
    fixed = scheduler.step(guide(cond, uncond, 3.0, x, c_skip, c_out), t, x).prev_sample
    assert torch.allclose(fixed, consistent, atol=1e-5)
    assert not torch.allclose(broken, consistent, atol=1e-2)


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_w_0_and_1_are_the_networks_own_outputs_bit_for_bit(net: UNet2DModel, w: float) -> None:
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 5, 7])
    asked, null = cls(labels), cls(torch.full_like(labels, 10))
    expected = network_output(net, x, 500, asked if w == 1 else null)
    with torch.no_grad():
        assert torch.equal(guided_output(net, x, 500, asked, null, w, 0.5, -0.5), expected)
        sigma = torch.tensor(3.0)
        edm = denoise(net, x, sigma, 0.5, asked, null, w)
        c_in = 1 / (sigma**2 + 0.25).sqrt()
        c_noise = sigma.log() / 4
        plain = network_output(net, c_in * x, c_noise.expand(3), asked if w == 1 else null)
        c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        assert torch.equal(edm, c_skip * x + c_out * plain)


def test_guided_denoisers_stay_in_range_for_ddpm_and_edm(net: UNet2DModel) -> None:
    """Both kinds' guided clean images lie in [-1, 1] at w = 6, even from a network whose
    outputs are far off (an untrained one, its last layer scaled up)."""
    loud = UNet2DModel.from_config(net.config).eval()
    loud.load_state_dict(net.state_dict())
    with torch.no_grad():
        loud.conv_out.weight.mul_(50)
    x = 3 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        asked, null = cls(labels), cls(torch.full_like(labels, 10))
        assert denoise(loud, x, torch.tensor(3.0), 0.5, asked, null, 6.0).abs().max() <= 1 + 1e-5
        scheduler = make_inference_scheduler("ddim", make_train_scheduler().config)
        t = torch.tensor(700)
        output = network_denoiser(loud, asked, null, 6.0, scheduler=scheduler)(x, t)
        c_skip, c_out = ddpm_coefficients(scheduler, t)
        assert (c_skip * x + c_out * output).abs().max() <= 1 + 1e-5


def test_guidance_without_the_samplers_schedule_is_refused(net: UNet2DModel) -> None:
    with pytest.raises(ValueError, match="scheduler"):
        network_denoiser(net, cls(torch.tensor([1])), cls(torch.tensor([10])), 3.0)
    network_denoiser(net, cls(torch.tensor([1])), cls(torch.tensor([10])), 1.0)  # nothing to read


def test_guidance_interval_keeps_w_inside_and_the_conditional_output_outside() -> None:
    assert guidance_at(4.0, 1.0, (0.28, 5.42)) == 4.0
    assert guidance_at(4.0, 5.42, (0.28, 5.42)) == 4.0  # (low, high]
    assert guidance_at(4.0, 0.28, (0.28, 5.42)) == 1.0
    assert guidance_at(4.0, 30.0, (0.28, 5.42)) == 1.0
    assert guidance_at(4.0, 30.0, None) == 4.0  # no interval: every step
    assert guidance_at(0.0, 30.0, (0.28, 5.42)) == 0.0  # w <= 1 (unconditional): as asked
    assert guidance_at(0.5, 30.0, (0.28, 5.42)) == 0.5


@pytest.mark.parametrize("kind", ["ddpm", "edm"])
def test_outside_the_interval_a_guided_step_is_one_conditional_forward(
    net: UNet2DModel, kind: str
) -> None:
    """Both kinds' denoisers: at a noise level outside the interval, the output is the
    conditional one bit for bit from a forward of the batch alone; inside it is guided."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([2, 5, 7])
    asked, null = cls(labels), cls(torch.full_like(labels, 10))
    rows = []
    hook = net.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    interval = (0.28, 5.42)
    with torch.no_grad():
        if kind == "ddpm":
            scheduler = make_inference_scheduler("ddim", make_train_scheduler().config)
            scheduler.set_timesteps(50)
            sigmas = {int(t): ddpm_sigma(scheduler, t) for t in scheduler.timesteps}
            outside = next(t for t, s in sigmas.items() if s > 5.42)
            inside = next(t for t, s in sigmas.items() if 0.28 < s <= 5.42)
            guided = network_denoiser(net, asked, null, 3.0, scheduler=scheduler,
                                      guidance_interval=interval)  # fmt: skip
            always = network_denoiser(net, asked, null, 3.0, scheduler=scheduler)
            conditional = network_denoiser(net, asked, null, 1.0)
            at = [torch.tensor(outside), torch.tensor(inside)]
        else:
            guided = edm_denoiser(net, 0.5, asked, null, 3.0, guidance_interval=interval)
            always = edm_denoiser(net, 0.5, asked, null, 3.0)
            conditional = edm_denoiser(net, 0.5, asked, null, 1.0)
            at = [torch.tensor(20.0), torch.tensor(2.0)]
        rows.clear()
        assert torch.equal(guided(x, at[0]), conditional(x, at[0]))
        assert rows == [3, 3]  # one forward of the 3 images each, no batched pair
        assert not torch.equal(always(x, at[0]), conditional(x, at[0]))
        assert torch.equal(guided(x, at[1]), always(x, at[1]))
    hook.remove()


def test_ddpm_sigma_is_the_noise_level_of_the_timestep() -> None:
    scheduler = make_train_scheduler("squaredcos_cap_v2", 1000, "v_prediction")
    alpha_bar = scheduler.alphas_cumprod[700]
    assert ddpm_sigma(scheduler, torch.tensor(700)) == pytest.approx(
        float(((1 - alpha_bar) / alpha_bar).sqrt()), rel=1e-5
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.28,5.42", (0.28, 5.42)), ("all", None), (" ALL ", None), ("0,1", (0.0, 1.0))],
)
def test_guidance_interval_flag_values(text: str, expected: tuple | None) -> None:
    assert parse_guidance_interval(text, "guidance_interval") == expected


@pytest.mark.parametrize("text", ["5", "a,b", "3,1", "-1,2", "1,2,3"])
def test_bad_guidance_intervals_are_refused_naming_the_flag(text: str) -> None:
    with pytest.raises(InputError, match="--sample-guidance-interval") as caught:
        parse_guidance_interval(text, "sample_guidance_interval")
    assert "LOW" in str(caught.value)
