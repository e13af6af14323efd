"""Sampling: reproducible per-sample seeding, every DDPM sampler against diffusers' own
denoising loop, and image conversion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from sampler_calls import run_ddpm
from torch import nn

from ddp_utils.images import make_grid, save_png, to_uint8
from diffusion.kinds.basic.formulation import sample_basic
from diffusion.kinds.ddpm.formulation import make_train_scheduler
from diffusion.kinds.ddpm.samplers import SCHEDULERS, make_inference_scheduler, sample_ddpm
from diffusion.networks.basic import BasicUNet
from diffusion.networks.unet import build_ddpm_unet
from diffusion.sampling import make_sample_generators, sample_seed


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """One intra-op thread: two OpenMP threads stall at every barrier on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    """Untrained digits-small UNet: sampling math does not need a trained model."""
    torch.manual_seed(0)
    return build_ddpm_unet("digits-small", resolution=16, channels=1).eval()


@pytest.fixture(scope="module")
def zero_unet() -> nn.Module:
    """A UNet whose output is exactly 0 (zeroed last conv), so every sampler step is pure
    elementwise arithmetic on x_t and the per-sample noise: batch-size-dependent matmul
    kernels cannot blur what the seeding itself guarantees."""
    torch.manual_seed(0)
    model = build_ddpm_unet("digits-small", resolution=16, channels=1).eval()
    with torch.no_grad():
        model.conv_out.weight.zero_()
        model.conv_out.bias.zero_()
    return model


def scheduler(name: str, prediction_type: str = "epsilon"):
    return make_inference_scheduler(
        name, make_train_scheduler(prediction_type=prediction_type).config
    )


def test_sample_seed_is_a_stable_63_bit_hash() -> None:
    seeds = {sample_seed(0, k) for k in range(1000)} | {sample_seed(1, k) for k in range(1000)}
    assert len(seeds) == 2000  # no collisions between samples or between nearby runs
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 1) != sample_seed(1, 0)
    assert sample_seed(42, 7) == sample_seed(42, 7)
    with pytest.raises(ValueError, match="index"):
        sample_seed(0, -1)


def test_ddim_with_eta_zero_is_deterministic_for_a_seed(unet: nn.Module) -> None:
    ddim = scheduler("ddim")
    first, _ = run_ddpm(unet, ddim, range(3), seed=5, num_inference_steps=4)
    second, _ = run_ddpm(unet, ddim, range(3), seed=5, num_inference_steps=4)
    other, _ = run_ddpm(unet, ddim, range(3), seed=6, num_inference_steps=4)
    assert torch.equal(first, second)
    assert (first - other).abs().mean() > 0.1


@pytest.mark.parametrize(("name", "eta"), [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samples_do_not_depend_on_the_batch_they_are_drawn_in(
    zero_unet: nn.Module, name: str, eta: float
) -> None:
    sampler = scheduler(name)
    together, _ = run_ddpm(zero_unet, sampler, range(6), seed=3, num_inference_steps=5, eta=eta)
    first, _ = run_ddpm(zero_unet, sampler, [0, 1, 2], seed=3, num_inference_steps=5, eta=eta)
    rest, _ = run_ddpm(zero_unet, sampler, [3, 4, 5], seed=3, num_inference_steps=5, eta=eta)
    # Bit-identical: the initial noise and every step's noise come from each sample's own stream.
    assert torch.equal(together, torch.cat([first, rest]))
    # ...and that stream is what makes the samples differ.
    assert (together[0] - together[1]).abs().mean() > 0.1


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_real_network_samples_agree_across_batchings_to_float_rounding(
    unet: nn.Module, name: str
) -> None:
    sampler = scheduler(name)
    eta = 1.0 if name == "ddim" else 0.0
    together, _ = run_ddpm(unet, sampler, range(6), seed=3, num_inference_steps=5, eta=eta)
    first, _ = run_ddpm(unet, sampler, [0, 1, 2], seed=3, num_inference_steps=5, eta=eta)
    rest, _ = run_ddpm(unet, sampler, [3, 4, 5], seed=3, num_inference_steps=5, eta=eta)
    # Not bit-identical: CPU matmuls (e.g. the time-embedding Linear) block differently for
    # batch 3 and batch 6, giving ~1e-6 differences; nothing larger may creep in.
    torch.testing.assert_close(together, torch.cat([first, rest]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_sampler_produces_images_and_progression(
    unet: nn.Module, name: str, prediction_type: str
) -> None:
    images, progression = run_ddpm(
        unet,
        scheduler(name, prediction_type),
        range(2),
        seed=0,
        num_inference_steps=4,
        progression_every=2,
    )
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.float32
    assert images.device.type == "cpu"
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert len(progression) >= 2 and progression[0].shape == (2, 1, 16, 16)


def sigma_max_80(scheduler):
    """EDM's sigma_max for a Karras spacing (through the config, where diffusers reads it)."""
    scheduler.register_to_config(sigma_max=80.0)
    return scheduler


# What each sampler name promises, spelled with diffusers' classes and options (written out
# again here, not read from diffusion.sampling's table).
DIFFUSERS_SPELLING = {
    "ddpm": lambda config: DDPMScheduler.from_config(config),
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpm-solver": lambda config: DPMSolverMultistepScheduler.from_config(
        config, timestep_spacing="leading"
    ),
    "dpm-solver-2m-karras": lambda config: sigma_max_80(
        DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
    ),
    "dpm-solver-3m-karras": lambda config: sigma_max_80(
        DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=3, use_karras_sigmas=True
        )
    ),
    "unipc": lambda config: UniPCMultistepScheduler.from_config(config, timestep_spacing="leading"),
    "euler-karras": lambda config: EulerDiscreteScheduler.from_config(
        config, use_karras_sigmas=True, sigma_max=80.0
    ),
    "heun-karras": lambda config: sigma_max_80(
        HeunDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    ),
}


@torch.no_grad()
def diffusers_loop(
    unet: nn.Module, scheduler, generators: list[torch.Generator], num_steps: int
) -> tuple[torch.Tensor, int]:
    """The denoising loop of diffusers' documentation: initial noise scaled by
    init_noise_sigma, scale_model_input before each evaluation. Returns (images, evaluations)."""
    scheduler.set_timesteps(num_steps)
    latents = randn_tensor((len(generators), 1, 16, 16), generator=generators)
    latents = latents * scheduler.init_noise_sigma
    evaluations = 0
    for t in scheduler.timesteps:
        noise_pred = unet(scheduler.scale_model_input(latents, t), t).sample
        evaluations += 1
        step_kwargs = {"generator": generators} if isinstance(scheduler, DDPMScheduler) else {}
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
    return latents.clamp(-1, 1), evaluations


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_sampler_is_the_diffusers_scheduler_its_name_says(unet: nn.Module, name: str) -> None:
    config = make_train_scheduler().config
    steps = 6
    ours, _ = run_ddpm(unet, make_inference_scheduler(name, config), range(3), 2, steps)
    reference, evaluations = diffusers_loop(
        unet, DIFFUSERS_SPELLING[name](config), make_sample_generators(2, range(3)), steps
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert ours.std() > 0.1
    # Heun evaluates twice per step but the last; the others once.
    assert evaluations == (2 * steps - 1 if name == "heun-karras" else steps)


@pytest.mark.parametrize(
    "name", ["dpm-solver-2m-karras", "dpm-solver-3m-karras", "euler-karras", "heun-karras"]
)
@pytest.mark.parametrize("num_steps", [4, 10, 20])
def test_karras_samplers_span_sigma_max_80_to_the_schedules_floor_with_rho_7(
    name: str, num_steps: int
) -> None:
    """Not the cosine schedule's sigma ~20,000 at t = 999, where half the steps would collapse
    onto t = 998 (and DPM-Solver, casting them to integers, fails at 4 steps)."""
    train = make_train_scheduler()
    sampler = make_inference_scheduler(name, train.config)
    sampler.set_timesteps(num_steps)
    sigmas = sampler.sigmas.double().unique_consecutive()
    sigmas = sigmas[sigmas > 0]
    floor = ((1 - train.alphas_cumprod[0]) / train.alphas_cumprod[0]).sqrt().item()
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-6)
    assert sigmas[-1].item() == pytest.approx(floor, rel=1e-4)
    root = sigmas ** (1 / 7)  # eq. 5: equal steps in sigma^(1/rho)
    torch.testing.assert_close(
        root.diff(), root.diff().mean().expand(len(root) - 1), rtol=1e-3, atol=0
    )
    assert len(sampler.timesteps.unique()) == len(sigmas)  # no two steps at one timestep


@pytest.mark.parametrize("name", ["dpm-solver-2m-karras", "dpm-solver-3m-karras"])
def test_dpm_solver_over_karras_levels_runs_every_step_where_its_first_timestep_repeats(
    unet: nn.Module, name: str
) -> None:
    """From 47 steps on, DPM-Solver's first Karras levels round to one timestep; diffusers then
    began at the second level and failed with an IndexError at the last step (50 steps:
    `sample.py --scheduler dpm-solver-2m-karras --num-steps 50`)."""
    scheduler = make_inference_scheduler(name, make_train_scheduler().config)
    scheduler.set_timesteps(50)
    assert (scheduler.timesteps == scheduler.timesteps[0]).sum() > 1  # the case
    calls = []

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t))
        return unet(x, t).sample

    images, _ = sample_ddpm(counting, scheduler, (1, 16, 16), range(2), 0, 50)
    assert len(calls) == 50 and calls == scheduler.timesteps.tolist()
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_sampler_is_the_same_from_the_training_config_and_from_the_saved_one(
    name: str, tmp_path: Path
) -> None:
    """A saved scheduler_config.json lists every key (clip_sample, timestep_spacing, ...), the
    in-memory config only those set by hand: neither may change the sampler's own knobs."""
    train = make_train_scheduler()
    train.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert "timestep_spacing" in saved and "_use_default_values" not in saved
    from_memory = make_inference_scheduler(name, train.config)
    from_disk = make_inference_scheduler(name, saved)
    for key in ("timestep_spacing", "clip_sample", "thresholding", "sigma_max"):
        assert from_memory.config.get(key) == from_disk.config.get(key), key
    from_memory.set_timesteps(10)
    from_disk.set_timesteps(10)
    assert torch.equal(from_memory.timesteps, from_disk.timesteps)


@pytest.mark.parametrize("name", [n for n in SCHEDULERS if n != "ddpm"])
@pytest.mark.parametrize("num_steps", [4, 20, 50])
def test_no_fast_sampler_starts_where_the_cosine_schedule_has_no_signal(
    name: str, num_steps: int
) -> None:
    """alpha_bar_999 = 2.4e-9 (sigma ~20,000): an epsilon model's x0 estimate there is noise
    times 20,000. Every fast sampler's first network evaluation is at sigma <= 80."""
    train = make_train_scheduler()
    sampler = make_inference_scheduler(name, train.config)
    sampler.set_timesteps(num_steps)
    first = int(sampler.timesteps[0])
    alpha_bar = train.alphas_cumprod[first].double()
    assert ((1 - alpha_bar) / alpha_bar).sqrt() <= 80.5, (first, alpha_bar)


def test_inference_scheduler_inherits_the_training_schedule() -> None:
    train = make_train_scheduler(prediction_type="v_prediction")
    for name in SCHEDULERS:
        sampler = make_inference_scheduler(name, train.config)
        assert sampler.config.prediction_type == "v_prediction", name
        torch.testing.assert_close(sampler.alphas_cumprod, train.alphas_cumprod)


def test_eta_is_refused_for_samplers_without_it(unet: nn.Module) -> None:
    with pytest.raises(ValueError, match="eta applies only to DDIM"):
        run_ddpm(unet, scheduler("ddpm"), [0], seed=0, num_inference_steps=2, eta=0.5)


def test_basic_sampler_ends_on_the_models_prediction() -> None:
    """The last step has mix factor 1, so the output is the model's final x0 estimate."""

    class Oracle(nn.Module):
        def forward(self, x: torch.Tensor, timestep: object = None) -> torch.Tensor:
            return torch.full_like(x, 0.25)

    images = sample_basic(Oracle(), 5, (1, 8, 8), [0, 1], seed=0, device="cpu")
    assert torch.equal(images, torch.full((2, 1, 8, 8), 0.25))


def test_basic_sampler_is_seeded_per_sample() -> None:
    torch.manual_seed(0)
    model = BasicUNet(1, 1).eval()
    together = sample_basic(model, 3, (1, 16, 16), range(4), seed=9, device="cpu")
    split = [sample_basic(model, 3, (1, 16, 16), [k], seed=9, device="cpu") for k in range(4)]
    assert together.shape == (4, 1, 16, 16) and together.min() >= 0 and together.max() <= 1
    torch.testing.assert_close(together, torch.cat(split), atol=1e-5, rtol=0)
    other_seed = sample_basic(model, 3, (1, 16, 16), range(4), seed=10, device="cpu")
    assert not torch.equal(together, other_seed)


def test_to_uint8_maps_the_value_range_to_0_255() -> None:
    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).repeat(2, 3, 1, 1)
    out = to_uint8(x, (-1.0, 1.0))
    assert out.shape == (2, 1, 5, 3) and out.dtype == np.uint8  # NCHW -> NHWC
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds up, ends clip
    assert to_uint8(torch.full((1, 1, 2, 2), 0.5), (0.0, 1.0)).max() == 128


def test_make_grid_tiles_images_with_padding_and_rgb() -> None:
    images = np.stack([np.full((4, 4, 1), 10 * (k + 1), dtype=np.uint8) for k in range(5)])
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (4 + 2) + 2, 3)  # 2 rows of 3, RGB
    assert (grid[2:6, 2:6] == 10).all()  # image 0 at top-left, inside the padding
    assert (grid[8:12, 2:6] == 40).all()  # image 3 starts the second row
    assert (grid[8:12, 14:18] == 0).all()  # empty slot after the last image
    assert (grid[0:2] == 0).all()
    assert make_grid(images).shape[:2] == (14, 20)  # default: ceil(sqrt(5)) = 3 per row


def test_save_png_writes_a_readable_image(tmp_path: Path) -> None:
    grid = make_grid(np.full((4, 8, 8, 3), 200, dtype=np.uint8), nrow=2)
    path = save_png(grid, tmp_path / "samples" / "grid.png")
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (grid.shape[1], grid.shape[0])
        assert np.array_equal(np.asarray(image), grid)
