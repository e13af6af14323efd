"""Autoencoder shapes by name: diffusers `AutoencoderKL` configs for `--preset`.

An `AutoencoderKL` halves the image side once per block after the first, so a preset with
B blocks maps an HxW image to an (H / 2^(B-1)) x (W / 2^(B-1)) grid of `latent_channels`
values (the mean and log-variance of a diagonal Gaussian per latent value).
"""

from __future__ import annotations

from typing import Any, Literal

from diffusers import AutoencoderKL

AutoencoderPreset = Literal["ae-digits", "sd-vae"]

AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # Small digits: 32x32x1 -> 8x8x4 latents (4x down), 0.4M parameters, a few CPU minutes.
    "ae-digits": {
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
    },
    # The Stable Diffusion VAE's shape (stabilityai/sd-vae-ft-ema): 8x down, 4 latent channels.
    "sd-vae": {
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
    },
}


def downsampling_factor(preset: str) -> int:
    """How many pixels per latent along each side: 2^(number of blocks - 1)."""
    return 2 ** (len(AUTOENCODER_PRESETS[preset]["block_out_channels"]) - 1)


def build_autoencoder(
    preset: str, resolution: int, channels: int, cls: type[AutoencoderKL] = AutoencoderKL
) -> AutoencoderKL:
    """A new `cls` (an AutoencoderKL) of `preset` for `channels`-channel images."""
    shape = AUTOENCODER_PRESETS[preset]
    num_blocks = len(shape["block_out_channels"])
    return cls(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        sample_size=resolution,
        **shape,
    )
