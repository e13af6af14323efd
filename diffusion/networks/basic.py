"""The basic model's networks: a small hand-written UNet (BasicUNet) and a UNet2DModel variant.

Both are diffusers `ModelMixin`s, so every model in this project is exported the same way
(`save_pretrained` -> `config.json` + `diffusion_pytorch_model.safetensors`) and loads from that
folder alone, without the training config.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from diffusion.networks.unet import check_channels, check_resolution


class BasicUNet(ModelMixin, ConfigMixin):
    """A minimal UNet: three 5x5 conv levels with additive skips, no time input.

    It predicts the clean image x0 from a corrupted one, so it needs no timestep. Made a
    diffusers `ModelMixin` so it exports/loads exactly like `UNet2DModel`.

    The tutorial network this reproduces also builds a `BatchNorm2d(64)` that `forward` never
    calls; it only changes the parameter count (309,185 instead of 309,057). `with_unused_batchnorm=True` recreates it for a faithful count; by
    default it is left out so DDP does not see parameters without gradients.
    """

    @register_to_config
    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, with_unused_batchnorm: bool = False
    ) -> None:
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
        if with_unused_batchnorm:
            self.batch_norm = nn.BatchNorm2d(64)

    def forward(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """Predict x0 from `sample`; `timestep` is accepted for a uniform call site and ignored."""
        x = sample
        skips: list[torch.Tensor] = []
        for i, layer in enumerate(self.down_layers):
            x = self.act(layer(x))
            if i < 2:  # the two upper levels feed skip connections, then downsample
                skips.append(x)
                x = self.downscale(x)
        for i, layer in enumerate(self.up_layers):
            if i > 0:
                x = self.upscale(x)
                x = x + skips.pop()  # out-of-place: `+=` would overwrite a tensor autograd saved
            # SiLU after the last layer too (output >= -0.28), as in the original network.
            x = self.act(layer(x))
        return x


# The UNet2DModel variant of the basic model (1,707,009 params at 1 channel).
_BASIC_UNET2D: dict[str, Any] = {
    "layers_per_block": 2,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}


def build_basic_model(name: Literal["basic", "unet"], resolution: int, channels: int) -> nn.Module:
    """The basic model's network: `"basic"` (BasicUNet) or `"unet"` (a UNet2DModel)."""
    check_channels(channels)
    check_resolution(resolution, num_downsamples=2)
    if name == "basic":
        return BasicUNet(in_channels=channels, out_channels=channels)
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, **_BASIC_UNET2D
    )
