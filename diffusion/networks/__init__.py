"""The networks a model can use (its backbone), behind the one call losses and samplers make.

Every backbone is a diffusers `ModelMixin`, so it exports as a folder (`config.json` +
safetensors) and loads from it alone:
- `BasicUNet` (basic.py): the basic model's small UNet; no time input, predicts the clean image;
- `UNet2DModel` presets (unet.py): DDPM and EDM, class-conditional through a class embedding;
- `DiTTransformer2DModel` presets (dit.py): a transformer on patches, conditioned by adaLN.

`predict(net, x, t, labels)` is the denoiser interface: a tensor shaped like x, whatever the
backbone. With `sample_shape` and `null_class` it is all a sampler needs to know of a network,
so every sampler works with every backbone. (The shipped pipelines call the same
`network_output`, from `pipeline_code/pipelines.py`, which may import only diffusers.)
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import DiTTransformer2DModel, ModelMixin, UNet2DModel
from torch import nn

from ddp_utils.errors import InputError
from diffusion.networks.basic import BasicUNet
from diffusion.networks.dit import DIT_PRESETS, build_dit, check_dit_preset, prepare_dit
from diffusion.networks.unet import DDPM_PRESETS, build_ddpm_unet, check_ddpm_preset
from diffusion.pipeline_code.pipelines import network_output, null_class, unwrap

Backbone = Literal["unet", "dit"]  # what --backbone chooses for DDPM and EDM models
BACKBONE_CLASSES: dict[str, type[ModelMixin]] = {
    "BasicUNet": BasicUNet,
    "UNet2DModel": UNet2DModel,
    "DiTTransformer2DModel": DiTTransformer2DModel,
}
DEFAULT_PRESETS: dict[str, str] = {"unet": "digits-small", "dit": "dit-digits"}

__all__ = [
    "BACKBONE_CLASSES",
    "Backbone",
    "backbone_of",
    "build_backbone",
    "check_preset",
    "count_parameters",
    "null_class",
    "predict",
    "prepare_loaded",
    "sample_shape",
    "unwrap",
]


def backbone_of(net: nn.Module) -> str:
    """ "basic", "unet" or "dit": which kind of network `net` (maybe wrapped) is; any network
    other than diffusers' two is called as the basic one is, net(x, t)."""
    model = unwrap(net)
    if isinstance(model, DiTTransformer2DModel):
        return "dit"
    return "unet" if isinstance(model, UNet2DModel) else "basic"


def preset_backbone(preset: str) -> Backbone | None:
    """The backbone a preset name implies (None: a JSON file, which says it by its keys)."""
    if preset in DIT_PRESETS:
        return "dit"
    return "unet" if preset in DDPM_PRESETS else None


def check_preset(backbone: Backbone, preset: str, resolution: int | None) -> None:
    """A preset (name or JSON file) of the backbone, checked against the resolution (None: not
    known yet) without building anything."""
    implied = preset_backbone(preset)
    if implied is not None and implied != backbone:
        raise InputError(
            f"{preset!r} is a {implied} preset, but --backbone is {backbone}: drop --backbone "
            f"(the preset implies it) or choose a {backbone} preset",
            "preset",
        )
    if backbone == "dit":
        check_dit_preset(preset, resolution)
    else:
        check_ddpm_preset(preset, resolution)


def build_backbone(
    backbone: Backbone, preset: str, resolution: int, channels: int, num_classes: int = 0
) -> nn.Module:
    """A new network of `preset` for images of `channels` x `resolution`^2; class-conditional
    with a "no class" entry when `num_classes` > 0."""
    if backbone == "dit":
        return build_dit(preset, resolution, channels, num_classes)
    return build_ddpm_unet(preset, resolution, channels, num_classes)


def prepare_loaded(net: nn.Module) -> nn.Module:
    """What a network read from disk needs before training or sampling (a DiT: diffusers' own
    label dropout off, as the toolkit drops labels itself)."""
    if isinstance(net, DiTTransformer2DModel):
        prepare_dit(net)
    return net


def predict(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float | int | None,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The network's output for x at time/noise input t, shaped like x, whatever the backbone.

    `net` may be wrapped (DDP, torch.compile): it is called as given so gradients synchronise.
    The basic model has no time input (t is ignored); the others take t as a scalar or (B,).
    `class_labels` (B,) go to a class-conditional network.
    """
    if backbone_of(net) == "basic":
        return net(x, t)
    return network_output(net, x, 0 if t is None else t, class_labels)


def sample_shape(net: nn.Module, resolution: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of one sample; the basic model is fully convolutional and takes
    the resolution it was trained at."""
    config = unwrap(net).config
    size = getattr(config, "sample_size", None) or resolution
    if size is None:
        raise ValueError(f"{type(unwrap(net)).__name__} has no sample size: pass the resolution")
    height, width = (size, size) if isinstance(size, int) else size
    return int(config.in_channels), int(height), int(width)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
