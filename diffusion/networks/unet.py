"""UNet2DModel presets for DDPM and EDM, checked against the data before anything is built
(a JSON preset file: its values too, and a build on the meta device, `preset_files`)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel

from ddp_utils.errors import InputError
from diffusion.networks.preset_files import check_builds, read_preset

# UNet2DModel kwargs without sample_size / in_channels / out_channels (those come from the data).
DDPM_PRESETS: dict[str, dict[str, Any]] = {
    # Small default for 16x16 / 32x32 grayscale digits on a 2-core CPU: 810,817 params at
    # 1 channel; forward+backward of a batch of 64 at 16x16 takes ~0.12 s on 2 threads.
    # Attention only at the lowest resolution (and in the mid block), where it is cheap;
    # (32, 64, 64) was ~40% slower per step for 37% more parameters.
    "digits-small": {
        "block_out_channels": (32, 32, 64),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
    },
    # 4,654,723 params at 3 channels: three levels, attention at the lowest (16x16 -> 8x8).
    "unet-4.7m": {
        "block_out_channels": (64, 64, 128),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
    },
    # 18,536,323 params at 3 channels: four levels, attention at the two lowest.
    "unet-18.5m": {
        "block_out_channels": (64, 128, 128, 256),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
    },
    # Ho et al. 2020's CIFAR-10 network as google/ddpm-cifar10-32 configures it (35,746,307
    # params): single-head attention at 16x16 (attention_head_dim=None -> one head of full
    # width), the original sinusoidal embedding (no sin/cos flip, shift 1) and the paper's
    # dropout 0.1, which the hub config omits because it only matters for training.
    "ddpm-cifar10": {
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "attention_head_dim": None,
        "dropout": 0.1,
        "norm_eps": 1e-6,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
    },
}

RENAMED_PRESETS = {"seed-small": "unet-4.7m", "seed-large": "unet-18.5m"}

_UNET_SIGNATURE = inspect.signature(UNet2DModel.__init__).parameters
_UNET_DEFAULT_DOWN_BLOCKS = _UNET_SIGNATURE["down_block_types"].default


def check_resolution(resolution: int, num_downsamples: int) -> None:
    """Each downsampling halves the image; an odd size would break the skip-connection shapes."""
    factor = 2**num_downsamples
    if resolution <= 0 or resolution % factor != 0:
        raise InputError(
            f"must be a positive multiple of {factor} for this model "
            f"({num_downsamples} downsamplings); got {resolution}",
            "resolution",
        )


def check_channels(channels: int) -> None:
    if channels < 1:
        raise ValueError(f"channels must be >= 1; got {channels}")


def _read_preset(preset: str) -> dict[str, Any]:
    """A preset name, or a JSON file holding UNet2DModel kwargs (e.g. an exported config.json)."""
    if preset in RENAMED_PRESETS:
        raise InputError(f"{preset!r} is now called {RENAMED_PRESETS[preset]!r}", "preset")
    config = read_preset(preset, DDPM_PRESETS, UNet2DModel)
    if preset in DDPM_PRESETS:
        return config
    path = Path(preset)
    lengths = {
        key: len(config.get(key, _UNET_SIGNATURE[key].default))
        for key in ("block_out_channels", "down_block_types", "up_block_types")
    }
    if len(set(lengths.values())) > 1:
        raise InputError(
            f"{path}: block_out_channels, down_block_types and up_block_types need one entry "
            f"per level each, got {', '.join(f'{n} {k}' for k, n in lengths.items())}",
            "preset",
        )
    # JSON has no tuples; diffusers stores them as tuples, so keep configs comparable.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def check_ddpm_preset(preset: str, resolution: int | None) -> dict[str, Any]:
    """The UNet2DModel arguments of a preset (a name or a JSON file), checked against the
    resolution (None: not known yet, taken from the data later): what a config validates
    before any compute. A JSON file's network is also built, on the meta device."""
    kwargs = _checked_preset(preset, resolution)
    if preset not in DDPM_PRESETS:
        size = resolution or 2 ** _num_downsamples(kwargs) * 2
        data = {"sample_size": size, "in_channels": 1, "out_channels": 1}  # the data's, later
        check_builds(Path(preset), UNet2DModel, {**kwargs, **data})
    return kwargs


def _checked_preset(preset: str, resolution: int | None) -> dict[str, Any]:
    kwargs = _read_preset(preset)
    if resolution is not None:
        check_resolution(resolution, num_downsamples=_num_downsamples(kwargs))
    return kwargs


def _num_downsamples(kwargs: dict[str, Any]) -> int:
    """UNet2DModel downsamples after every down block but the last."""
    return max(len(kwargs.get("down_block_types", _UNET_DEFAULT_DOWN_BLOCKS)) - 1, 0)


def build_ddpm_unet(
    preset: str, resolution: int, channels: int, num_classes: int = 0
) -> UNet2DModel:
    """Build a timestep-conditioned UNet2DModel from a preset name or a JSON config file.

    `resolution` and `channels` come from the data and override whatever the preset says, so a
    config exported from a 32x32 RGB run can be reused on 16x16 grayscale digits. With
    `num_classes` C > 0 the UNet is class-conditional: a learned embedding of C + 1 entries,
    the last one ("no class", index C) for classifier-free guidance, added to the time
    embedding.
    """
    check_channels(channels)
    kwargs = _checked_preset(preset, resolution)
    kwargs.update(sample_size=resolution, in_channels=channels, out_channels=channels)
    if num_classes:
        kwargs["num_class_embeds"] = num_classes + 1
    return UNet2DModel(**kwargs)
