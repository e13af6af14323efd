"""Corruption, DDPM training math and EMA: the numbers a training run is built on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ddp_utils.ema import EMA
from diffusion.kinds.basic.formulation import corrupt
from diffusion.kinds.ddpm.formulation import NoiseTables, diffusion_loss, make_train_scheduler
from diffusion.networks.unet import build_ddpm_unet


def tables_of(scheduler) -> NoiseTables:
    return NoiseTables.build(scheduler, "cpu")


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Run on one intra-op thread. These tests are tiny, and on a shared 2-core machine two
    OpenMP threads stall at every barrier when another process holds a core (measured: 40
    training steps took 21 s on two threads vs 3 s on one, with two busy processes beside)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- corruption


def test_corrupt_blends_image_and_noise_by_amount() -> None:
    x = torch.rand(3, 1, 8, 8)
    noise = torch.rand(3, 1, 8, 8)
    out = corrupt(x, torch.tensor([0.0, 1.0, 0.25]), noise=noise)
    assert torch.equal(out[0], x[0])  # amount 0: the clean image
    assert torch.equal(out[1], noise[1])  # amount 1: pure noise
    torch.testing.assert_close(out[2], 0.75 * x[2] + 0.25 * noise[2])


def test_corrupt_draws_uniform_noise_reproducibly() -> None:
    x = torch.zeros(4, 1, 32, 32)
    ones = torch.ones(4)
    first = corrupt(x, ones, generator=torch.Generator().manual_seed(1))
    again = corrupt(x, ones, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert first.min() >= 0 and first.max() < 1  # U[0, 1), like torch.rand_like
    assert abs(first.mean().item() - 0.5) < 0.05


def test_corrupt_rejects_one_amount_for_a_batch() -> None:
    with pytest.raises(ValueError, match="amount"):
        corrupt(torch.rand(4, 1, 8, 8), torch.tensor(0.5))


# ----------------------------------------------------------------------------- DDPM math


def reference_alpha_bar(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), computed independently in float64."""
    return torch.cumprod(1 - scheduler.betas.double(), dim=0)[timesteps]


TIMESTEPS = torch.tensor([0, 10, 250, 500, 999])


@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear"])
def test_add_noise_is_ddpm_forward_process(beta_schedule: str) -> None:
    scheduler = make_train_scheduler(beta_schedule=beta_schedule)
    x0 = torch.rand(5, 1, 4, 4) * 2 - 1
    eps = torch.randn(5, 1, 4, 4)
    abar = reference_alpha_bar(scheduler, TIMESTEPS).view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps  # DDPM eq. 4
    torch.testing.assert_close(
        scheduler.add_noise(x0, eps, TIMESTEPS).double(), expected, atol=1e-5, rtol=0
    )


def test_cosine_schedule_keeps_signal_at_t0_and_destroys_it_at_T() -> None:
    abar = reference_alpha_bar(make_train_scheduler(), torch.tensor([0, 999]))
    assert abar[0] > 0.999 and abar[1] < 1e-4


def test_training_targets_match_their_closed_forms() -> None:
    x0 = torch.rand(5, 1, 4, 4) * 2 - 1
    eps = torch.randn(5, 1, 4, 4)
    eps_tables = tables_of(make_train_scheduler(prediction_type="epsilon"))
    assert torch.equal(eps_tables.target(x0, eps, TIMESTEPS), eps)
    x0_tables = tables_of(make_train_scheduler(prediction_type="sample"))
    assert torch.equal(x0_tables.target(x0, eps, TIMESTEPS), x0)
    v_scheduler = make_train_scheduler(prediction_type="v_prediction")
    abar = reference_alpha_bar(v_scheduler, TIMESTEPS).view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0  # Salimans & Ho 2022
    v_target = tables_of(v_scheduler).target(x0, eps, TIMESTEPS)
    torch.testing.assert_close(v_target.double(), v, atol=1e-5, rtol=0)
    # Op for op what diffusers computes: training here equals training with its scheduler.
    assert torch.equal(v_target, v_scheduler.get_velocity(x0, eps, TIMESTEPS))
    noisy = tables_of(v_scheduler).add_noise(x0, eps, TIMESTEPS)
    assert torch.equal(noisy, v_scheduler.add_noise(x0, eps, TIMESTEPS))


def test_noise_tables_live_on_the_device_they_are_built_for() -> None:
    tables = NoiseTables.build(make_train_scheduler(), "meta")
    assert {t.device.type for t in (tables.sqrt_alpha_bar, tables.snr)} == {"meta"}
    assert tables.num_timesteps == 1000


@pytest.mark.parametrize(
    ("prediction_type", "weight"),
    [
        ("epsilon", lambda s, g: torch.clamp(s, max=g) / s),
        ("v_prediction", lambda s, g: torch.clamp(s, max=g) / (s + 1)),
        ("sample", lambda s, g: torch.clamp(s, max=g)),
    ],
)
def test_min_snr_weights_match_hang_et_al(prediction_type: str, weight) -> None:
    scheduler = make_train_scheduler(prediction_type=prediction_type)
    abar = reference_alpha_bar(scheduler, TIMESTEPS)
    expected_snr = abar / (1 - abar)
    tables = tables_of(scheduler)
    torch.testing.assert_close(tables.snr[TIMESTEPS].double(), expected_snr, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        tables.min_snr_weights(TIMESTEPS, 5.0).double(),
        weight(expected_snr, 5.0),
        rtol=1e-4,
        atol=1e-6,
    )


def test_min_snr_down_weights_only_the_nearly_clean_timesteps() -> None:
    weights = tables_of(make_train_scheduler(prediction_type="epsilon")).min_snr_weights(
        TIMESTEPS, gamma=5.0
    )
    assert weights[0] < 0.01  # t=0: SNR ~ 1e4, weight gamma/SNR
    assert weights[-1] == 1.0  # t=999: SNR < gamma, full weight


def test_diffusion_loss_is_the_mean_of_its_per_sample_terms() -> None:
    torch.manual_seed(0)
    model = build_ddpm_unet("digits-small", 16, 1)
    tables = tables_of(make_train_scheduler())
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 200, 600, 999])
    loss, per_sample = diffusion_loss(model, tables, x0, t, noise, min_snr_gamma=None)
    assert per_sample.shape == (4,) and not per_sample.requires_grad
    torch.testing.assert_close(loss, per_sample.mean())
    weighted, same = diffusion_loss(model, tables, x0, t, noise, min_snr_gamma=5.0)
    torch.testing.assert_close(same, per_sample)
    torch.testing.assert_close(weighted, (tables.min_snr_weights(t, 5.0) * per_sample).mean())
    weighted.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_scheduler_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="number of timesteps must be >= 2"):
        make_train_scheduler(num_train_timesteps=1)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        tables_of(make_train_scheduler()).min_snr_weights(TIMESTEPS, gamma=0.0)


def test_ddpm_loss_falls_when_fitting_a_few_images() -> None:
    """A smoke test of the whole training objective: 8 fixed 16x16 'digits', 150 AdamW steps."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x0 = (torch.rand(8, 1, 16, 16, generator=generator) > 0.7).float() * 2 - 1
    model = build_ddpm_unet("digits-small", 16, 1)
    tables = tables_of(make_train_scheduler())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        t = torch.randint(0, 1000, (8,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss, _ = diffusion_loss(model, tables, x0, t, noise, min_snr_gamma=5.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


# ----------------------------------------------------------------------------- EMA


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_ema_decay_warms_up_then_caps() -> None:
    ema = EMA(small_model(), max_decay=0.999)
    assert ema.decay(0) == pytest.approx(1 / 10)
    assert ema.decay(10) == pytest.approx(11 / 20)
    assert ema.decay(1_000_000) == 0.999


def test_ema_update_is_decay_weighted_average_and_copies_buffers() -> None:
    model = small_model()
    ema = EMA(model, max_decay=0.9)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.fill_(3.0)
    ema.update(model, step=1000)  # warmup over: decay = max_decay = 0.9
    new = ema.state_dict()
    for name, p in model.named_parameters():
        torch.testing.assert_close(new[name], 0.9 * old[name] + 0.1 * p.detach())
    assert torch.equal(new["1.running_mean"], torch.full((4,), 3.0))


def test_ema_state_dict_round_trips_through_safetensors(tmp_path: Path) -> None:
    model = small_model()
    ema = EMA(model)
    with torch.no_grad():
        model[0].weight.mul_(2)
    ema.update(model, step=3)
    save_file(ema.state_dict(), tmp_path / "ema.safetensors")
    restored = EMA(small_model())
    restored.load_state_dict(load_file(tmp_path / "ema.safetensors"))
    for name, value in ema.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)
    # The keys are the bare model's: the EMA weights load straight into a model for sampling.
    fresh = small_model()
    fresh.load_state_dict(ema.state_dict())


def test_ema_load_rejects_another_models_weights() -> None:
    ema = EMA(small_model())
    state = ema.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        ema.load_state_dict({k: v for k, v in state.items() if k != "3.bias"})
    with pytest.raises(ValueError, match="unexpected keys"):
        ema.load_state_dict({**state, "module.3.bias": state["3.bias"]})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({**state, "3.bias": torch.zeros(3)})


def test_swapped_into_uses_ema_weights_then_restores_raw_ones() -> None:
    model = small_model()
    ema = EMA(model)
    with torch.no_grad():
        model[3].weight.fill_(7.0)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_into(model):
        assert torch.equal(model[3].weight, ema.state_dict()["3.weight"])
        assert not torch.equal(model[3].weight, raw["3.weight"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, raw[name])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_into(model):
        raise RuntimeError("boom")
    assert torch.equal(model[3].weight, raw["3.weight"])
