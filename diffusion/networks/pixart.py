"""PixArt-alpha's transformer (Chen et al. 2023), diffusers' `PixArtTransformer2DModel`: a DiT
whose blocks attend to a text encoder's sequence embeddings (cross-attention after each
self-attention), with one adaLN of the timestep shared by every block ("adaLN-single").

Why PixArt and not SD3's MMDiT (`SD3Transformer2DModel`): PixArt takes the condition a
UNet2DConditionModel takes, `encoder_hidden_states` and `encoder_attention_mask`, so the text
condition, guidance and every sampler serve both backbones unchanged. The MMDiT also needs a
pooled text embedding (`pooled_projections`, from CLIP's projection in SD3) with every call,
and is trained on the concatenation of two or three encoders' sequences: another condition,
for another issue.

The encoder's sequence (width `caption_channels`) is projected to the transformer's width by
the model's caption projection; `cross_attention_dim` is the transformer's own width. A preset
that does not name `caption_channels` takes the encoder's; one that does must match it
(`diffusion.networks.check_text_width`). PixArt-alpha's size conditioning (resolution and
aspect ratio, its 1024px model's) is off.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from diffusers import PixArtTransformer2DModel

from ddp_utils.errors import InputError
from diffusion.networks.preset_files import check_builds, read_preset

# PixArtTransformer2DModel kwargs without sample_size / in_channels / out_channels /
# caption_channels / cross_attention_dim (the data's, the encoder's, the width).
PIXART_PRESETS: dict[str, dict[str, Any]] = {
    # For the 16x16 captioned digits (64 tokens of 2x2 patches): dit-digits' width 96 and
    # depth 4, 4 heads.
    "pixart-digits": {
        "num_layers": 4,
        "num_attention_heads": 4,
        "attention_head_dim": 24,
        "patch_size": 2,
    },
}

_SIGNATURE = inspect.signature(PixArtTransformer2DModel.__init__).parameters


def _read_preset(preset: str) -> dict[str, Any]:
    return read_preset(preset, PIXART_PRESETS, PixArtTransformer2DModel)


def _patch_size(kwargs: dict[str, Any]) -> int:
    return kwargs.get("patch_size", _SIGNATURE["patch_size"].default)


def _complete(kwargs: dict[str, Any], resolution: int, channels: int) -> dict[str, Any]:
    """The arguments the data and the width set: the output has the input's channels (no
    learned variance), cross-attention at the transformer's width, no size conditioning."""
    heads = kwargs.get("num_attention_heads", _SIGNATURE["num_attention_heads"].default)
    head_dim = kwargs.get("attention_head_dim", _SIGNATURE["attention_head_dim"].default)
    return {**kwargs, "sample_size": resolution, "in_channels": channels,
            "out_channels": channels, "cross_attention_dim": heads * head_dim,
            "use_additional_conditions": False}  # fmt: skip


def check_pixart_preset(preset: str, resolution: int | None) -> dict[str, Any]:
    """The PixArtTransformer2DModel arguments of a preset (a name or a JSON file), checked
    against the resolution (None: not known yet); a JSON file's network is also built, on the
    meta device."""
    kwargs = _read_preset(preset)
    patch_size = _patch_size(kwargs)
    if resolution is not None and (resolution <= 0 or resolution % patch_size != 0):
        raise InputError(
            f"must be a positive multiple of the patch size {patch_size} for this model; "
            f"got {resolution}",
            "resolution",
        )
    if preset not in PIXART_PRESETS:
        data = _complete(kwargs, resolution or patch_size * 4, 1)
        check_builds(Path(preset), PixArtTransformer2DModel, {"caption_channels": 8, **data})
    return kwargs


def build_pixart(
    preset: str, resolution: int, channels: int, text_width: int
) -> PixArtTransformer2DModel:
    """A PixArtTransformer2DModel of `preset` for images of `channels` x `resolution`^2 that
    attends to `text_width`-wide text embeddings (checked against the preset's by the caller)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1; got {channels}")
    kwargs = check_pixart_preset(preset, resolution)
    return PixArtTransformer2DModel(
        **_complete(kwargs, resolution, channels), caption_channels=text_width
    )
