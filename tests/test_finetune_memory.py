"""The fine-tuning memory table's counts (bench/finetune_memory.py): its denoisers are the
published ones, and its LoRA arithmetic is what peft adds. Meta-device builds, no training."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from bench.finetune_memory import (
    FAMILIES,
    LORA_RANK,
    lora_parameters,
    num_params,
    with_lora,
)
from diffusion.adapters import ATTENTION_PROJECTIONS, LoraSpec, add_lora
from diffusion.networks.text_unet import SD15_PARAMETERS

FAMILY = {family.title: family for family in FAMILIES}


@pytest.mark.parametrize(
    ("title", "published"),
    [("SD 1.5", SD15_PARAMETERS), ("Flux.1-dev", 11_901_408_320)],  # Flux: its checkpoint's count
)
def test_the_tables_denoisers_are_what_diffusers_builds_from_the_published_configs(
    title: str, published: int
) -> None:
    family = FAMILY[title]
    with torch.device("meta"):
        built = family.network_class.from_config(family.config)
    assert num_params(family.build()) == num_params(built) == published


def test_the_lora_count_is_what_peft_adds_to_a_unet() -> None:
    """A rank-16 adapter on the attention projections: r (in + out) per adapted layer, the
    parameters the toolkit's `add_lora` (peft, through diffusers) trains, and the table's."""
    config = {
        "sample_size": 4, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "layers_per_block": 1,
        "attention_head_dim": 2, "cross_attention_dim": 24, "norm_num_groups": 8,
    }  # fmt: skip
    unet = UNet2DConditionModel(**config)
    expected = lora_parameters(unet, LORA_RANK, ATTENTION_PROJECTIONS)
    # Attention blocks at c channels: 3 at 16 (one down, two up), 1 at 32 (the middle). Each
    # adapts self-attention's 4 c->c layers and cross-attention's to_q, to_out (c->c) and
    # to_k, to_v (24->c): r (8c + 4c + 2 (c + 24)) parameters.
    assert expected == LORA_RANK * (3 * (14 * 16 + 48) + (14 * 32 + 48))
    add_lora(unet, LoraSpec(LORA_RANK, float(LORA_RANK), 0.0, ATTENTION_PROJECTIONS))
    assert num_params(unet, trainable_only=True) == expected
    assert num_params(with_lora(UNet2DConditionModel(**config)), trainable_only=True) == expected
    assert lora_parameters(unet, LORA_RANK, ("to_q",)) < expected
