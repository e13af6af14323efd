"""Model construction, export and loading: what a user sees when picking or reusing a network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from diffusion.loading import load_model
from diffusion.networks import count_parameters, predict
from diffusion.networks.basic import BasicUNet, build_basic_model
from diffusion.networks.unet import DDPM_PRESETS, build_ddpm_unet


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Run on one intra-op thread. These tests are tiny, and on a shared 2-core machine two
    OpenMP threads stall at every barrier when another process holds a core (measured: 40
    training steps took 21 s on two threads vs 3 s on one, with two busy processes beside)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class SeedBasicUNet(nn.Module):
    """The tutorial's BasicUNet verbatim, as the numerical reference."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1) -> None:
        super().__init__()
        self.down_layers = nn.ModuleList(
            [
                nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
                nn.Conv2d(32, 64, kernel_size=5, padding=2),
                nn.Conv2d(64, 64, kernel_size=5, padding=2),
            ]
        )
        self.up_layers = nn.ModuleList(
            [
                nn.Conv2d(64, 64, kernel_size=5, padding=2),
                nn.Conv2d(64, 32, kernel_size=5, padding=2),
                nn.Conv2d(32, out_channels, kernel_size=5, padding=2),
            ]
        )
        self.act = nn.SiLU()
        self.downscale = nn.MaxPool2d(2)
        self.upscale = nn.Upsample(scale_factor=2)
        self.batch_norm = nn.BatchNorm2d(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = []
        for i, layer in enumerate(self.down_layers):
            x = self.act(layer(x))
            if i < 2:
                h.append(x)
                x = self.downscale(x)
        for i, layer in enumerate(self.up_layers):
            if i > 0:
                x = self.upscale(x)
                x += h.pop()
            x = self.act(layer(x))
        return x


def architecture(config) -> dict:
    """Config entries that define the network (diffusers' "_" bookkeeping dropped, JSON lists
    compared as tuples)."""
    return {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in config.items()
        if not k.startswith("_")
    }


def test_basic_unet_parameter_counts_match_the_seed() -> None:
    assert count_parameters(BasicUNet(1, 1)) == 309_057
    # The tutorial's unused BatchNorm2d(64) adds 128 parameters: its printed count is 309,185.
    assert count_parameters(BasicUNet(1, 1, with_unused_batchnorm=True)) == 309_185


def test_basic_unet_computes_exactly_what_the_seed_computes() -> None:
    torch.manual_seed(0)
    ours = BasicUNet(1, 1, with_unused_batchnorm=True).eval()
    seed = SeedBasicUNet(1, 1).eval()
    seed.load_state_dict(ours.state_dict())
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(ours(x), seed(x))


def test_basic_unet_trains_without_autograd_errors() -> None:
    model = BasicUNet(1, 1)
    x = torch.rand(2, 1, 16, 16)
    ((model(x) - x) ** 2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_seed_section_1_5_unet_parameter_count() -> None:
    with torch.device("meta"):
        model = build_basic_model("unet", resolution=28, channels=1)
    assert isinstance(model, UNet2DModel)
    assert count_parameters(model) == 1_707_009


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("unet-4.7m", 4_654_723),
        ("unet-18.5m", 18_536_323),
        ("ddpm-cifar10", 35_746_307),
        ("digits-small", 811_971),
    ],
)
def test_ddpm_preset_parameter_counts_for_rgb(preset: str, expected: int) -> None:
    with torch.device("meta"):  # no weight init: counting a 35M-parameter net stays instant
        model = build_ddpm_unet(preset, resolution=32, channels=3)
    assert count_parameters(model) == expected


@pytest.mark.parametrize(("name", "resolution", "channels"), [("basic", 28, 1), ("unet", 16, 3)])
def test_basic_models_return_images_shaped_like_their_input(
    name: str, resolution: int, channels: int
) -> None:
    model = build_basic_model(name, resolution, channels).eval()
    x = torch.rand(2, channels, resolution, resolution)
    with torch.no_grad():
        assert predict(model, x, None).shape == x.shape


@pytest.mark.parametrize(("preset", "resolution", "channels"), [("digits-small", 16, 1)])
def test_ddpm_unet_returns_images_shaped_like_its_input(
    preset: str, resolution: int, channels: int
) -> None:
    model = build_ddpm_unet(preset, resolution, channels).eval()
    x = torch.randn(3, channels, resolution, resolution)
    with torch.no_grad():
        assert predict(model, x, torch.tensor([0, 500, 999])).shape == x.shape


def test_predict_sees_through_wrappers() -> None:
    torch.manual_seed(0)
    model = build_ddpm_unet("digits-small", 16, 1).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        # DataParallel stands in for DDP here (both expose `.module`); on CPU it just forwards.
        assert torch.equal(predict(nn.DataParallel(model), x, 10), predict(model, x, 10))


@pytest.mark.parametrize(
    "make",
    [
        lambda: BasicUNet(1, 1, with_unused_batchnorm=True),
        lambda: build_ddpm_unet("digits-small", 16, 1),
    ],
    ids=["BasicUNet", "UNet2DModel"],
)
def test_exported_model_loads_back_with_identical_outputs(make, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make().eval()
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_model(tmp_path / "export").eval()
    assert type(loaded) is type(model)
    assert architecture(loaded.config) == architecture(model.config)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(predict(loaded, x, 7), predict(model, x, 7))


def test_load_model_rejects_folders_that_are_not_exports(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_model(tmp_path)


def test_json_preset_builds_the_same_network_and_takes_size_from_the_data(
    tmp_path: Path,
) -> None:
    with torch.device("meta"):
        reference = build_ddpm_unet("digits-small", resolution=16, channels=1)
        # An exported config.json (with diffusers' "_" keys) is a valid preset file.
        path = tmp_path / "unet.json"
        path.write_text(json.dumps(dict(build_ddpm_unet("digits-small", 32, 3).config)))
        model = build_ddpm_unet(str(path), resolution=16, channels=1)
    assert count_parameters(model) == count_parameters(reference)
    assert architecture(model.config) == architecture(reference.config)


def test_json_preset_with_unknown_keys_is_rejected_by_name(tmp_path: Path) -> None:
    path = tmp_path / "unet.json"
    path.write_text(json.dumps({**DDPM_PRESETS["digits-small"], "layers_per_blok": 2}))
    with pytest.raises(ValueError, match="layers_per_blok"):
        build_ddpm_unet(str(path), resolution=16, channels=1)


def test_unknown_and_renamed_presets_are_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="--preset: must be one of digits-small, unet-4.7m"):
        build_ddpm_unet("digits-large", resolution=16, channels=1)
    with pytest.raises(ValueError, match="--preset: 'seed-small' is now called 'unet-4.7m'"):
        build_ddpm_unet("seed-small", resolution=16, channels=1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_basic_model("basic", resolution=30, channels=1),
        lambda: build_basic_model("unet", resolution=14, channels=1),
        lambda: build_ddpm_unet("unet-18.5m", resolution=20, channels=3),  # needs a multiple of 8
    ],
)
def test_resolution_the_network_cannot_halve_is_a_clear_error(build) -> None:
    with pytest.raises(ValueError, match="--resolution"):
        build()
