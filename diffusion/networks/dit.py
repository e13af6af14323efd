"""DiT backbones (Peebles & Xie 2022, "Scalable Diffusion Models with Transformers") built as
diffusers' `DiTTransformer2DModel`, so an export loads in diffusers and a latent
class-conditional one runs in the stock `DiTPipeline`.

diffusers' DiT differs from the paper's code in three ways this module makes up for:
- every block's `LabelEmbedding` drops labels by itself in training mode (10%, from the global
  RNG, independently per block): `prepare_dit` turns that off, because the toolkit drops labels
  itself with a seeded generator (bit-exact resume, same result on 1 or N processes);
- every block has its own timestep + label embedder where the paper shares one, so
  `paper_parameter_count` subtracts the copies to compare with the paper;
- diffusers keeps PyTorch's default init; `build_dit` applies the paper's adaLN-Zero init.

Labels: a model with C classes (`num_embeds_ada_norm` C) has C + 1 label rows; row C is
"no class", the one classifier-free guidance uses (DiTPipeline's `class_null = 1000`). An
unconditional DiT is built with one class and always fed class 0: diffusers' DiT cannot run
without labels. Whether a run is conditional is recorded in the toolkit's task.json.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

from diffusers import DiTTransformer2DModel
from torch import nn

from ddp_utils.errors import InputError
from diffusion.networks.preset_files import check_builds, read_preset


def _size(depth: int, hidden: int, heads: int, patch_size: int = 2) -> dict[str, Any]:
    """A size as the paper's Table 1 gives it, in DiTTransformer2DModel's terms."""
    return {
        "num_layers": depth,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "patch_size": patch_size,
    }


# DiTTransformer2DModel kwargs without sample_size / in_channels / out_channels /
# num_embeds_ada_norm (those come from the data). diffusers' block has a 4x feed-forward
# (FeedForward's default mult=4) and tanh-GELU, the paper's MLP.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    # For the 16x16 grayscale digits (64 tokens of 2x2 patches), sized so that a training step
    # (batch 64, AdamW, one CPU thread) costs about what the default UNet "digits-small" does:
    # 1.03-1.16x its CPU time per step (four runs of bench/dit_step.py on a shared 2-core
    # machine; ~250 ms) for 828,964 parameters at 10 classes. Hidden 128 was 1.19x at depth 3
    # and 1.6x at depth 4; hidden 96 at depth 5 was 1.35x.
    "dit-digits": _size(depth=4, hidden=96, heads=4),
    # The paper's sizes, patch 2.
    "dit-s-2": _size(depth=12, hidden=384, heads=6),
    "dit-b-2": _size(depth=12, hidden=768, heads=12),
    "dit-l-2": _size(depth=24, hidden=1024, heads=16),
    "dit-xl-2": _size(depth=28, hidden=1152, heads=16),
}

# The paper's Table 4 parameter counts (millions, rounded there) at its setting: 256x256
# ImageNet as 32x32x4 latents, 1000 classes, learned sigma (8 output channels).
PAPER_PARAMETERS: dict[str, int] = {
    "dit-s-2": 33_000_000,
    "dit-b-2": 130_000_000,
    "dit-l-2": 458_000_000,
    "dit-xl-2": 675_000_000,
}

_DIT_SIGNATURE = inspect.signature(DiTTransformer2DModel.__init__).parameters


def _read_preset(preset: str) -> dict[str, Any]:
    """A preset name, or a JSON file of DiTTransformer2DModel kwargs (an exported config.json)."""
    return read_preset(preset, DIT_PRESETS, DiTTransformer2DModel)


def check_dit_preset(preset: str, resolution: int | None) -> dict[str, Any]:
    """The DiTTransformer2DModel arguments of a preset (a name or a JSON file), checked against
    the resolution (None: not known yet). A JSON file's network is also built, on the meta
    device."""
    kwargs = _checked_preset(preset, resolution)
    if preset not in DIT_PRESETS:
        data = {  # what the data and the classes set, later
            "sample_size": resolution or _patch_size(kwargs) * 4, "in_channels": 1,
            "out_channels": 1, "num_embeds_ada_norm": 1,
        }  # fmt: skip
        check_builds(Path(preset), DiTTransformer2DModel, {**kwargs, **data})
    return kwargs


def _patch_size(kwargs: dict[str, Any]) -> int:
    return kwargs.get("patch_size", _DIT_SIGNATURE["patch_size"].default)


def _checked_preset(preset: str, resolution: int | None) -> dict[str, Any]:
    kwargs = _read_preset(preset)
    patch_size = _patch_size(kwargs)
    if resolution is not None and (resolution <= 0 or resolution % patch_size != 0):
        raise InputError(
            f"must be a positive multiple of the patch size {patch_size} for this model "
            f"(the image is cut into {patch_size}x{patch_size} patches); got {resolution}: "
            f"resize to {max(patch_size, resolution // patch_size * patch_size)} "
            "or pick a preset with a patch size that divides it",
            "resolution",
        )
    return kwargs


def build_dit(
    preset: str,
    resolution: int,
    channels: int,
    num_classes: int = 0,
    out_channels: int | None = None,
) -> DiTTransformer2DModel:
    """Build a DiT from a preset name or a JSON config file, initialised as in the paper and
    made ready for the toolkit's training (`prepare_dit`).

    `resolution` and `channels` come from the data and override the preset. `num_classes` 0
    builds an unconditional DiT (one class, always fed label 0). `out_channels` defaults to
    `channels` (the toolkit does not learn the variance); 2 * channels is the paper's
    learned-sigma head, which DiTPipeline recognises and splits off.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1; got {channels}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0; got {num_classes}")
    kwargs = _checked_preset(preset, resolution)
    kwargs.update(
        sample_size=resolution,
        in_channels=channels,
        # Always written out: DiTPipeline computes `config.out_channels // 2` and fails on None.
        out_channels=channels if out_channels is None else out_channels,
        num_embeds_ada_norm=num_classes or 1,
    )
    model = DiTTransformer2DModel(**kwargs)
    _initialize_weights(model)
    return prepare_dit(model)


def _initialize_weights(model: DiTTransformer2DModel) -> None:
    """The paper code's `DiT.initialize_weights` (adaLN-Zero), mapped onto diffusers' modules.

    Zeroing every adaLN modulation and the output projection makes each block start as the
    identity and the network output exactly 0, which the paper found trains best.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    # Patch embedding like a Linear (weight flattened to (d, C p p)); its bias keeps Conv2d's
    # default init, as in the paper's code.
    weight = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    # The paper's attention has one fused qkv Linear(d, 3d); xavier over that shape draws from
    # +-sqrt(6 / 4d), narrower than separate (d, d) q, k, v projections would get.
    bound = math.sqrt(6 / (4 * model.inner_dim))
    for block in model.transformer_blocks:
        for projection in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v):
            nn.init.uniform_(projection.weight, -bound, bound)
        embedder = block.norm1.emb
        nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def prepare_dit(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Turn off diffusers' own label dropout in every block; call after every build or load.

    diffusers constructs each block's `LabelEmbedding` with dropout 0.1 (not a config field,
    so every `from_pretrained` / `from_config` brings it back): in training mode each block
    (and the final layer, which re-runs block 0's embedder) would then drop labels with its
    own draw from the global RNG. With dropout 0 the label tables keep their C + 1 rows, so the
    "no class" row C is still there for the toolkit's seeded dropout and for guidance.
    Idempotent; returns the model for chaining.
    """
    for block in model.transformer_blocks:
        labels = block.norm1.emb.class_embedder
        assert labels.embedding_table.num_embeddings == labels.num_classes + 1, (
            "a DiT label table must hold a 'no class' row"
        )
        labels.dropout_prob = 0.0
    return model


def num_classes(model: DiTTransformer2DModel) -> int:
    """The classes the model was built for (1 for an unconditional DiT, which is fed class 0)."""
    return model.config.num_embeds_ada_norm


def null_class(model: DiTTransformer2DModel) -> int:
    """The "no class" label for classifier-free guidance: the last row of each label table."""
    return model.config.num_embeds_ada_norm


def paper_parameter_count(model: DiTTransformer2DModel) -> int:
    """The parameter count of the same network in the paper's code, where one timestep + label
    embedder serves every block: diffusers' count minus the embedders of blocks 1..N-1.

    The paper's logged counts (`DiT Parameters:` in its train.py) also include its fixed
    sin-cos position table, a frozen `nn.Parameter` there and a buffer in diffusers:
    add num_patches * hidden to compare with those exactly.
    """

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    copies = sum(count(block.norm1.emb) for block in model.transformer_blocks[1:])
    return count(model) - copies
