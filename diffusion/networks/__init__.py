"""The networks a model can use (its backbone), each described by one `Backbone` spec.

Every backbone is a diffusers `ModelMixin`, so it exports as a folder (`config.json` +
safetensors) and loads from it alone:
- `unet`: `UNet2DModel` presets (unet.py), class-conditional through a class embedding;
- `dit`: `DiTTransformer2DModel` presets (dit.py), a transformer on patches, conditioned by
  adaLN;
- `basic`: the basic model's small `BasicUNet` (basic.py): no time input, predicts the image;
- `text-unet`: `UNet2DConditionModel` presets (text_unet.py), Stable Diffusion's UNet, and
  `pixart`: `PixArtTransformer2DModel` presets (pixart.py): text-conditional, through
  cross-attention to a text encoder's sequence embeddings, whose width they take.

A spec says what the rest of the toolkit needs of a backbone: its class, the export component
holding it, its presets and how to check and build them, what a network read from disk needs,
and its call. `predict(net, x, t, condition)` is the denoiser interface: a tensor shaped like
x, whatever the backbone; with `sample_shape` it is all a sampler needs to know of a network.
A new backbone is a module here and a spec in `BACKBONES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    DiTTransformer2DModel,
    ModelMixin,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from ddp_utils.errors import InputError
from diffusion.networks.basic import BasicUNet
from diffusion.networks.dit import DIT_PRESETS, build_dit, check_dit_preset, prepare_dit
from diffusion.networks.pixart import PIXART_PRESETS, build_pixart, check_pixart_preset
from diffusion.networks.text_unet import (
    TEXT_UNET_PRESETS,
    build_text_unet,
    check_text_unet_preset,
)
from diffusion.networks.unet import (
    DDPM_PRESETS,
    RENAMED_PRESETS,
    build_ddpm_unet,
    check_ddpm_preset,
)
from diffusion.pipeline_code.core import Condition, network_output, unwrap

Call = Callable[[nn.Module, torch.Tensor, Any, Condition | None], torch.Tensor]


def _unet_classes(net: nn.Module) -> int:
    """A UNet's classes: its class embeddings but the last ("no class"); none without."""
    return int(getattr(unwrap(net).config, "num_class_embeds", None) or 1) - 1


def _dit_classes(net: nn.Module) -> int:
    """A DiT's classes: its label table's rows but the last; an unconditional one has 1."""
    num = int(unwrap(net).config.num_embeds_ada_norm or 1)
    return num if num > 1 else 0


def _unet_blocks(net: nn.Module) -> tuple[str, ...]:
    """A UNet's down, mid and up blocks: one FSDP unit each under --sharding."""
    net = unwrap(net)
    blocks = [*net.down_blocks, net.mid_block, *net.up_blocks]
    return tuple(sorted({type(block).__name__ for block in blocks if block is not None}))


def _transformer_blocks(net: nn.Module) -> tuple[str, ...]:
    """A DiT's or PixArt's transformer blocks: one FSDP unit each under --sharding; a DiT's
    blocks' label-and-time embeddings too, which diffusers' DiT also calls from outside the
    block (`transformer_blocks[0].norm1.emb`, for the final layer): a unit of their own is
    gathered wherever they are called."""
    net = unwrap(net)
    names = {type(block).__name__ for block in net.transformer_blocks}
    embeddings = [getattr(block.norm1, "emb", None) for block in net.transformer_blocks]
    return tuple(sorted(names | {type(emb).__name__ for emb in embeddings if emb is not None}))


def _basic_call(
    net: nn.Module, x: torch.Tensor, t: Any, condition: Condition | None
) -> torch.Tensor:
    """The BasicUNet has no time or condition input: net(x)."""
    return net(x, t)


@dataclass(frozen=True)
class Backbone:
    """A network family: what building, exporting, loading and calling it takes."""

    name: str  # --backbone's value, and what task.json records
    network_class: type[ModelMixin]
    component: str  # the pipeline component holding it (diffusers' name: unet, transformer)
    presets: Mapping[str, Any]  # named sizes (a JSON file of the class's arguments works too)
    default_preset: str | None  # of a new train_ddpm.py run; None: not trained by it
    # (preset, resolution) -> the preset's arguments, checked without building anything
    check_preset: Callable[[str, int | None], Any] | None = None
    # (preset, resolution, channels, num_classes) -> a new network; a text-conditional
    # backbone's takes the text encoder's width in place of the classes
    build: Callable[[str, int, int, int], nn.Module] | None = None
    prepare: Callable[[nn.Module], nn.Module] = lambda net: net  # after a load from disk
    call: Call = network_output  # (net, x, t, condition) -> the output, shaped like x
    num_classes: Callable[[nn.Module], int] = lambda net: 0  # the classes it was built for
    tags: tuple[str, ...] = ()  # the model card's hub tags
    # A text-conditional backbone: the argument holding the width of the text embeddings it
    # attends to (its preset's, else the encoder's); None: it takes no text
    text_width_key: str | None = None
    # The classes of a network's blocks, one FSDP unit each under --sharding; () cannot shard
    shard_units: Callable[[nn.Module], tuple[str, ...]] = lambda net: ()


BACKBONES: dict[str, Backbone] = {
    backbone.name: backbone
    for backbone in (
        Backbone("unet", UNet2DModel, "unet", DDPM_PRESETS, "digits-small", check_ddpm_preset,
                 build_ddpm_unet, num_classes=_unet_classes, shard_units=_unet_blocks),
        Backbone("dit", DiTTransformer2DModel, "transformer", DIT_PRESETS, "dit-digits",
                 check_dit_preset, build_dit, prepare_dit, num_classes=_dit_classes,
                 tags=("dit", "transformer"), shard_units=_transformer_blocks),
        Backbone("text-unet", UNet2DConditionModel, "unet", TEXT_UNET_PRESETS, "digits-text",
                 check_text_unet_preset, build_text_unet, text_width_key="cross_attention_dim",
                 shard_units=_unet_blocks),
        Backbone("pixart", PixArtTransformer2DModel, "transformer", PIXART_PRESETS,
                 "pixart-digits", check_pixart_preset, build_pixart,
                 tags=("pixart", "transformer"), text_width_key="caption_channels",
                 shard_units=_transformer_blocks),
        Backbone("basic", BasicUNet, "unet", {}, None, call=_basic_call,
                 shard_units=lambda net: ("Conv2d",)),  # its three levels down and up
    )
}  # fmt: skip
BY_CLASS = {backbone.network_class.__name__: backbone for backbone in BACKBONES.values()}
# What --backbone chooses: the backbones train_ddpm.py builds.
BackboneName = Literal[tuple(n for n, b in BACKBONES.items() if b.default_preset)]  # type: ignore[misc]
BACKBONE_CLASSES: dict[str, type[ModelMixin]] = {
    name: backbone.network_class for name, backbone in BY_CLASS.items()
}


def backbone_of(net: nn.Module) -> Backbone:
    """The backbone of `net` (maybe wrapped, or sharded: FSDP2's class derives from the
    network's); any other module is called as the basic model is, net(x, t)."""
    for cls in type(unwrap(net)).__mro__:
        if cls.__name__ in BY_CLASS:
            return BY_CLASS[cls.__name__]
    return BACKBONES["basic"]


def backbone_named(name: str) -> Backbone:
    return BACKBONES[name]


def network_class(name: str) -> type[ModelMixin]:
    """The class a config's or checkpoint's `_class_name` names."""
    if name not in BY_CLASS:
        raise ValueError(f"unknown model class {name!r}; expected one of {sorted(BY_CLASS)}")
    return BY_CLASS[name].network_class


def preset_backbone(preset: str) -> str | None:
    """The backbone a preset name implies (None: a JSON file, which says it by its keys)."""
    for backbone in BACKBONES.values():
        if preset in backbone.presets:
            return backbone.name
    return None


def all_presets() -> str:
    """Every named preset, by backbone, for messages."""
    return "; ".join(f"{b.name}: {', '.join(b.presets)}" for b in BACKBONES.values() if b.presets)


def check_preset(backbone: str, preset: str, resolution: int | None) -> None:
    """A preset (name or JSON file) of the backbone, checked against the resolution (None: not
    known yet) without building anything."""
    implied = preset_backbone(preset)
    looks_like_a_name = not preset.endswith(".json") and "/" not in preset
    if implied is None and looks_like_a_name and not Path(preset).exists():
        if preset not in RENAMED_PRESETS:
            raise InputError(
                f"{preset!r} is neither a preset nor a JSON file; the presets: {all_presets()}",
                "preset",
            )
    if implied is not None and implied != backbone:
        raise InputError(
            f"{preset!r} is a {implied} preset, but --backbone is {backbone}: drop --backbone "
            f"(the preset implies it) or choose a {backbone} preset",
            "preset",
        )
    BACKBONES[backbone].check_preset(preset, resolution)


def build_backbone(
    backbone: str,
    preset: str,
    resolution: int,
    channels: int,
    num_classes: int = 0,
    text_width: int | None = None,
) -> nn.Module:
    """A new network of `preset` for images of `channels` x `resolution`^2; class-conditional
    with a "no class" entry when `num_classes` > 0; a text-conditional backbone attends to
    `text_width`-wide text embeddings (required for it, refused for the others)."""
    spec = BACKBONES[backbone]
    assert (text_width is not None) == takes_text(backbone), (backbone, text_width)
    if text_width is None:
        return spec.build(preset, resolution, channels, num_classes)
    assert not num_classes, "a model is conditioned on classes or on text"
    check_text_width(backbone, preset, text_width)
    return spec.build(preset, resolution, channels, text_width)


def takes_text(backbone: str) -> bool:
    """Whether the backbone is conditioned on text (cross-attention to a text encoder's
    sequence embeddings)."""
    return BACKBONES[backbone].text_width_key is not None


def text_backbones() -> list[str]:
    return [name for name in BACKBONES if takes_text(name)]


def check_text_width(backbone: str, preset: str, width: int) -> None:
    """A text-conditional preset that names the width of the embeddings it attends to (`sd15`:
    768, CLIP ViT-L/14's) must be given an encoder of that width; one that names none takes
    the encoder's."""
    key = BACKBONES[backbone].text_width_key
    stated = BACKBONES[backbone].check_preset(preset, None).get(key)
    if stated is not None and int(stated) != width:
        raise InputError(
            f"--preset {preset} attends to {stated}-wide text embeddings ({key}) and this "
            f"encoder's are {width}-wide: give the text encoder the preset was made for, or a "
            f"preset without {key} (it then takes the encoder's width)",
            "text_encoder",
        )


def prepare_loaded(net: nn.Module) -> nn.Module:
    """What a network read from disk needs before training or sampling (a DiT: diffusers' own
    label dropout off, as the toolkit drops labels itself)."""
    return backbone_of(net).prepare(net)


def predict(
    net: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float | int | None,
    condition: Condition | None = None,
) -> torch.Tensor:
    """The network's output for x at time/noise input t, shaped like x, whatever the backbone.

    `net` may be wrapped (DDP, torch.compile): it is called as given so gradients synchronise.
    The basic model has no time input (t is ignored); the others take t as a scalar or (B,).
    `condition` (keyword inputs, batch-first) goes to a conditional network.
    """
    return backbone_of(net).call(net, x, 0 if t is None else t, condition)


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
