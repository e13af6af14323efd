"""UNet2DConditionModel presets: Stable Diffusion's UNet, which attends to a text encoder's
sequence embeddings through cross-attention (`encoder_hidden_states`).

Its `cross_attention_dim` is the text encoder's width: a preset that does not name one takes
the encoder's, and one that does (`sd15`: CLIP ViT-L/14's 768) must match it
(`diffusion.networks.check_text_width`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from diffusers import UNet2DConditionModel

from diffusion.networks.preset_files import check_builds, read_preset
from diffusion.networks.unet import check_channels, check_resolution

# UNet2DConditionModel kwargs without sample_size / in_channels / out_channels (the data's).
TEXT_UNET_PRESETS: dict[str, dict[str, Any]] = {
    # For the 16x16 captioned digits with tiny-clip: the class UNet's digits-small levels
    # (32, 32, 64), with cross-attention at 8x8, 4x4 and in the middle (Stable Diffusion keeps
    # it off its finest level too); 4 heads; 1,162,785 parameters at 1 channel and width 32.
    "digits-text": {
        "block_out_channels": (32, 32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "attention_head_dim": 4,  # diffusers' name for the number of heads here
        "norm_num_groups": 8,
    },
    # Stable Diffusion 1.x's UNet (CompVis/stable-diffusion-v1-4, v1-5's unet/config.json):
    # 859,520,964 parameters on 64x64x4 latents with CLIP ViT-L/14's 768-wide embeddings.
    "sd15": {
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "norm_num_groups": 32,
    },
}
SD15_PARAMETERS = 859_520_964  # Stable Diffusion 1.5's UNet, as published

_SIGNATURE = inspect.signature(UNet2DConditionModel.__init__).parameters


def _read_preset(preset: str) -> dict[str, Any]:
    config = read_preset(preset, TEXT_UNET_PRESETS, UNet2DConditionModel)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _num_downsamples(kwargs: dict[str, Any]) -> int:
    """UNet2DConditionModel downsamples after every down block but the last."""
    return max(len(kwargs.get("down_block_types", _SIGNATURE["down_block_types"].default)) - 1, 0)


def check_text_unet_preset(preset: str, resolution: int | None) -> dict[str, Any]:
    """The UNet2DConditionModel arguments of a preset (a name or a JSON file), checked against
    the resolution (None: not known yet); a JSON file's network is also built, on the meta
    device."""
    kwargs = _read_preset(preset)
    if resolution is not None:
        check_resolution(resolution, num_downsamples=_num_downsamples(kwargs))
    if preset not in TEXT_UNET_PRESETS:
        size = resolution or 2 ** _num_downsamples(kwargs) * 2
        data = {"sample_size": size, "in_channels": 1, "out_channels": 1}  # the data's, later
        check_builds(Path(preset), UNet2DConditionModel, {**kwargs, **data})
    return kwargs


def build_text_unet(
    preset: str, resolution: int, channels: int, text_width: int
) -> UNet2DConditionModel:
    """A UNet2DConditionModel of `preset` for images of `channels` x `resolution`^2 that attends
    to `text_width`-wide text embeddings (checked against the preset's by the caller)."""
    check_channels(channels)
    kwargs = check_text_unet_preset(preset, resolution)
    kwargs.update(sample_size=resolution, in_channels=channels, out_channels=channels,
                  cross_attention_dim=text_width)  # fmt: skip
    return UNet2DConditionModel(**kwargs)
