"""What fine-tuning each pipeline family needs per GPU, full and LoRA: a table by arithmetic,
and a measured CPU run that shows the arithmetic holds.

    # the table (arithmetic, no GPU): 7 families at their native resolution, 8 GPUs,
    # batch 4 per GPU, bf16 compute
    python bench/finetune_memory.py table --gpus 8 --batch-size 4
    # measured: peak memory of a few full fine-tune steps against a few LoRA steps of a Stable
    # Diffusion pipeline built from a config, each in a fresh process on this CPU, fp32
    python bench/finetune_memory.py measure
    # autocast's bf16 weight copies as counted, against what a real bf16 forward saves
    python bench/finetune_memory.py copies

The table: each family's denoiser built from its published config (FAMILIES below: the
`config.json` of the hub repository named) on the meta device, in the model-state arithmetic
and activation count of `bench/sharding_memory.py` (its docstring has the method):
- full fine-tune: fp32 weights 4, gradients 4, AdamW 8, EMA 4 bytes per parameter, and DDP's
  gradient buckets 4: 24 P under DDP; under FSDP2 20 P / N plus the root's and two units'
  gathered bytes. The units are what `--sharding fsdp` shards today: a UNet's down, mid and
  up blocks, a transformer's blocks (SD3's and Flux's: the blocks diffusers never splits);
- LoRA of rank 16 on the attention projections (the toolkit's default targets): the base
  frozen, at 4 bytes per parameter as the toolkit keeps it (fp32), or 2 if it were cast to
  bf16; the adapter's 20 (24 under DDP) bytes per parameter; under FSDP2 the base's and the
  adapter's shards, the root's bf16 weights, and two units in flight (their bf16 weights, the
  adapter's gradients);
- activations: a bf16 forward on the meta device at the batch, the family's native resolution
  and its text length (tokens, width), counting what autograd saves (fused attention: no
  T x T scores). With gradient checkpointing the units are what diffusers' own
  `enable_gradient_checkpointing` recomputes (`--gradient-checkpointing` calls it): a UNet's
  resnets and transformer blocks, a transformer's blocks;
- autocast's bf16 copies: under DDP the weights are fp32 and autocast computes in bf16, so a
  weight that autograd saves for the backward is held as a bf16 copy: counted as the bytes of
  the parameters the forward saves (a full fine-tune keeps every copy till the forward ends,
  in autocast's cache, checkpointing or not). Under FSDP2 the weights are gathered in bf16,
  and a bf16 base is its own copy: none.
Not counted: the CUDA context and allocator slack (~1-3 GB), temporaries, the data, and the
VAE, which stays on the device to decode the grids (its size is listed: 0.16 GiB in bf16).
The text encoders leave the device once the text cache is built (their sizes are listed).

`measure`: `train_ddpm.py --init-from` a StableDiffusionPipeline whose UNet has Stable
Diffusion 1.x's layout at a fifth of its width (34M parameters) on 32x32x4 latents, with the
tests' tiny CLIP and a small VAE; 3 steps of batch 4 in fp32, full and LoRA, each in a fresh
process. Resident memory (Linux's VmRSS, and ru_maxrss for the peak) when the network is
handed to Accelerate, at the end of a training forward (the highest), and at its peak as of
the last step; the peak's rise over the first (what training adds: gradients, AdamW, EMA,
activations) against the arithmetic for the same network, batch and dtype (one process: no
buckets, no autocast); the sizes of the last checkpoint and of the export. Resident memory
counts what the C allocator keeps as well as live tensors (no CPU figure of torch's own
counts live bytes only; on a GPU, `bench/sharding_memory.py measure` reads
max_memory_allocated): run it also with MALLOC_MMAP_THRESHOLD_=131072, where glibc gives
large freed blocks back at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FluxTransformer2DModel,
    ModelMixin,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from peft import inject_adapter_in_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from bench.common import git_revision, machine, print_table, tree_state  # noqa: E402
from bench.sharding_memory import (  # noqa: E402
    ADAMW_BYTES,
    BUCKET_BYTES,
    EMA_BYTES,
    GRAD_BYTES,
    TRAINED_BYTES,
    WEIGHT_BYTES,
    GiB,
    checkpointed_bytes,
    count_saved,
    ddp_state_bytes,
    fsdp_state_bytes,
    outermost,
    train_tracking_memory,
)
from diffusion.adapters import ADAPTER_NAME, ATTENTION_PROJECTIONS, LoraSpec  # noqa: E402
from diffusion.networks import BACKBONES  # noqa: E402
from diffusion.text_encoders import TINY_CLIP_MAX_LENGTH, tiny_clip  # noqa: E402

LORA_RANK = 16
BF16_BYTES = 2
UNET_CHECKPOINTED = ("ResnetBlock2D", "BasicTransformerBlock")

# Stable Diffusion 1.x's UNet: runwayml/stable-diffusion-v1-5, unet/config.json (the keys that
# differ from UNet2DConditionModel's defaults).
SD15_UNET = {
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "layers_per_block": 2, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "sample_size": 64,
}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """A pipeline family's denoiser as published, and what it is trained on."""

    title: str
    source: str  # the hub repository whose <component>/config.json `config` is
    network_class: type[ModelMixin]
    config: dict[str, Any]
    published: str  # the parameter count its authors state
    resolution: int  # native image size; the latents are 1/8 of it
    latent_channels: int
    text: tuple[int, int]  # (tokens, width) of the text sequence the denoiser attends to
    encoders: tuple[str, ...]  # its text encoders (ENCODERS' names)
    vae: str  # its VAE (VAES' name)
    # The blocks diffusers' enable_gradient_checkpointing recomputes (a UNet: every resnet and
    # transformer block; a transformer: every block)
    checkpointed: tuple[str, ...]

    def build(self, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        with torch.device("meta"):
            return self.network_class(**self.config).to(dtype)

    def shard_units(self, net: nn.Module) -> tuple[str, ...]:
        """What --sharding fsdp makes a unit: the toolkit's backbone's blocks (a UNet's down,
        mid and up blocks; PixArt's blocks); for SD3 and Flux, which the toolkit does not
        train yet, their transformer blocks."""
        if self.network_class is UNet2DConditionModel:
            return BACKBONES["text-unet"].shard_units(net)
        if self.network_class is PixArtTransformer2DModel:
            return BACKBONES["pixart"].shard_units(net)
        return self.checkpointed


FAMILIES = [
    Family("SD 1.5", "runwayml/stable-diffusion-v1-5", UNet2DConditionModel, SD15_UNET,
           "860M (CompVis/stable-diffusion README)", 512, 4, (77, 768), ("CLIP ViT-L/14",),
           "SD VAE", UNET_CHECKPOINTED),
    Family("SD 2.1", "stabilityai/stable-diffusion-2-1", UNet2DConditionModel,
           {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": True, "upcast_attention": True, "sample_size": 96},
           "as 1.5's (Stability-AI/stablediffusion README)", 768, 4, (77, 1024),
           ("OpenCLIP ViT-H/14",), "SD VAE", UNET_CHECKPOINTED),
    Family("SDXL base", "stabilityai/stable-diffusion-xl-base-1.0", UNet2DConditionModel,
           {"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True},
           "2.6B (SDXL paper, Podell et al. 2023)", 1024, 4, (77, 2048),
           ("CLIP ViT-L/14", "OpenCLIP ViT-bigG/14"), "SD VAE", UNET_CHECKPOINTED),
    Family("PixArt-alpha 512", "PixArt-alpha/PixArt-XL-2-512x512", PixArtTransformer2DModel,
           {"activation_fn": "gelu-approximate", "attention_bias": True,
            "attention_head_dim": 72, "caption_channels": 4096, "cross_attention_dim": 1152,
            "in_channels": 4, "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "norm_type": "ada_norm_single", "num_attention_heads": 16,
            "num_embeds_ada_norm": 1000, "num_layers": 28, "out_channels": 8, "patch_size": 2,
            "sample_size": 64, "use_additional_conditions": False},
           "0.6B (PixArt-alpha paper, Chen et al. 2023)", 512, 4, (120, 4096),
           ("T5 v1.1 XXL encoder",), "SD VAE", ("BasicTransformerBlock",)),
    Family("SD3 medium", "stabilityai/stable-diffusion-3-medium-diffusers",
           SD3Transformer2DModel,
           {"attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16,
            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
            "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192, "sample_size": 128},
           "2B (Stability AI's model card)", 1024, 16, (77 + 256, 4096),
           ("CLIP ViT-L/14 + projection", "OpenCLIP ViT-bigG/14", "T5 v1.1 XXL encoder"),
           "16-channel VAE", ("JointTransformerBlock",)),
    Family("SD3.5 large", "stabilityai/stable-diffusion-3.5-large", SD3Transformer2DModel,
           {"attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16,
            "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38,
            "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128},
           "8.1B (Stability AI's model card)", 1024, 16, (77 + 256, 4096),
           ("CLIP ViT-L/14 + projection", "OpenCLIP ViT-bigG/14", "T5 v1.1 XXL encoder"),
           "16-channel VAE", ("JointTransformerBlock",)),
    Family("Flux.1-dev", "black-forest-labs/FLUX.1-dev", FluxTransformer2DModel,
           {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
            "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
            "axes_dims_rope": [16, 56, 56]},
           "12B (Black Forest Labs' model card)", 1024, 16, (512, 4096),
           ("CLIP ViT-L/14", "T5 v1.1 XXL encoder"), "16-channel VAE",
           ("FluxTransformerBlock", "FluxSingleTransformerBlock")),
]  # fmt: skip

# The text encoders and VAEs of those pipelines (text_encoder*/config.json, vae/config.json of
# the same repositories), built on the meta device for their sizes.
_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
           "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu",
           "projection_dim": 768}  # fmt: skip
ENCODERS: dict[str, tuple[type[nn.Module], Any]] = {
    "CLIP ViT-L/14": (CLIPTextModel, CLIPTextConfig(**_CLIP_L)),
    "CLIP ViT-L/14 + projection": (CLIPTextModelWithProjection, CLIPTextConfig(**_CLIP_L)),
    "OpenCLIP ViT-H/14": (CLIPTextModel, CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, hidden_act="gelu", projection_dim=512)),
    "OpenCLIP ViT-bigG/14": (CLIPTextModelWithProjection, CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, hidden_act="gelu", projection_dim=1280)),
    "T5 v1.1 XXL encoder": (T5EncoderModel, T5Config(
        vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
        feed_forward_proj="gated-gelu")),
}  # fmt: skip
_SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
           "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4}  # fmt: skip
VAES = {
    "SD VAE": _SD_VAE,
    "16-channel VAE": {**_SD_VAE, "latent_channels": 16, "use_quant_conv": False,
                       "use_post_quant_conv": False},
}  # fmt: skip


def num_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def encoder_parameters(name: str) -> int:
    cls, config = ENCODERS[name]
    with torch.device("meta"):
        return num_params(cls(config))


def vae_parameters(name: str) -> int:
    with torch.device("meta"):
        return num_params(AutoencoderKL(**VAES[name]))


def lora_parameters(net: nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """The parameters a LoRA of `rank` adds to the linear layers `targets` names (peft's
    matching: a layer's name is a target or ends with "." + one): r (in + out) each."""
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in net.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == t or name.endswith(f".{t}") for t in targets)
    )


def with_lora(net: nn.Module) -> nn.Module:
    """`net` frozen, with the toolkit's default adapter (rank 16 on the attention projections)
    injected by peft, as diffusers' `add_adapter` does (PixArt's class lacks that method)."""
    net.requires_grad_(False)
    spec = LoraSpec(LORA_RANK, float(LORA_RANK), 0.0, ATTENTION_PROJECTIONS)
    return inject_adapter_in_model(spec.config(), net, adapter_name=ADAPTER_NAME)


def denoiser_inputs(family: Family, batch: int, dtype: torch.dtype) -> dict[str, Any]:
    """One training forward's inputs on the meta device: noisy latents at the native
    resolution, timesteps, the text sequence and what else the family's denoiser takes."""

    def empty(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=kind)

    size = family.resolution // 8
    tokens, width = family.text
    inputs: dict[str, Any] = {"timestep": empty(batch, kind=torch.float32),
                              "encoder_hidden_states": empty(batch, tokens, width)}  # fmt: skip
    cls = family.network_class
    if cls is FluxTransformer2DModel:  # latents packed 2x2: (B, tokens, 4 C)
        inputs |= {"hidden_states": empty(batch, (size // 2) ** 2, 4 * family.latent_channels),
                   "pooled_projections": empty(batch, family.config["pooled_projection_dim"]),
                   "img_ids": empty((size // 2) ** 2, 3), "txt_ids": empty(tokens, 3),
                   "guidance": empty(batch, kind=torch.float32)}  # fmt: skip
        return inputs
    inputs["hidden_states"] = empty(batch, family.latent_channels, size, size)
    if cls is SD3Transformer2DModel:
        inputs["pooled_projections"] = empty(batch, family.config["pooled_projection_dim"])
    elif cls is PixArtTransformer2DModel:
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    elif family.config.get("addition_embed_type") == "text_time":  # SDXL: pooled text, sizes
        inputs["added_cond_kwargs"] = {"text_embeds": empty(batch, 1280),
                                       "time_ids": empty(batch, 6)}  # fmt: skip
    return inputs


def call(net: nn.Module, inputs: dict[str, Any]) -> Callable[[], object]:
    """The forward `count_saved` runs: the positional sample of a UNet, keywords otherwise."""
    if isinstance(net, UNet2DConditionModel):
        rest = {k: v for k, v in inputs.items() if k != "hidden_states"}
        return lambda: net(inputs["hidden_states"], **rest)
    return lambda: net(**inputs)


def units_of(net: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    return outermost([m for m in net.modules() if type(m).__name__ in names])


def activations(net: nn.Module, family: Family, batch: int, dtype: torch.dtype) -> dict:
    """What one forward saves (`count_saved`), per checkpointed unit: all of it, with
    checkpointing, and autocast's copies of the saved weights with and without it."""
    units = units_of(net, family.checkpointed)
    act = count_saved(net, units, call(net, denoiser_inputs(family, batch, dtype)))
    return {
        "all": act["all"],
        "checkpointed": checkpointed_bytes(act),
        "copies": act["params_outside"] + sum(act["params_per_unit"]),
        "copies_checkpointed": act["params_outside"] + max(act["params_per_unit"], default=0),
    }


@dataclass
class Needs:
    """One family's figures, in parameters and bytes per GPU."""

    params: int
    adapter: int
    ddp: int  # full fine-tune's model state under DDP
    fsdp: float  # ... under FSDP2
    fsdp_finer: float  # ... with the checkpointed blocks as units (a UNet's resnets, ...)
    lora_ddp: dict[int, int]  # by the base's bytes per parameter (4: fp32, 2: bf16)
    lora_fsdp: dict[int, float]
    full_act: dict
    lora_act: dict


def needs(family: Family, batch: int, gpus: int) -> Needs:
    """Model state by arithmetic and activations counted, for `batch` per GPU over `gpus`."""
    net = family.build()
    params = num_params(net)
    names = family.shard_units(net)

    def fsdp_state(names: tuple[str, ...]) -> float:
        units = units_of(net, names)
        root = params - sum(num_params(u) for u in units)
        return fsdp_state_bytes(params, root, max(num_params(u) for u in units), gpus)

    fsdp, fsdp_finer = fsdp_state(names), fsdp_state(family.checkpointed)
    full_act = activations(net, family, batch, torch.bfloat16)
    del net

    net = with_lora(family.build())
    adapter = num_params(net, trainable_only=True)
    assert adapter == lora_parameters(family.build(), LORA_RANK, ATTENTION_PROJECTIONS)
    units = units_of(net, names)
    base = num_params(net) - adapter
    lora_root = num_params(net) - sum(num_params(u) for u in units)
    by_unit = [(num_params(u) - num_params(u, True), num_params(u, True)) for u in units]
    largest_base = max(b for b, _ in by_unit)
    largest_adapter = max(a for _, a in by_unit)
    lora_act = activations(net, family, batch, torch.bfloat16)
    adapter_ddp = (TRAINED_BYTES + BUCKET_BYTES) * adapter
    in_flight = BF16_BYTES * lora_root + 2 * (BF16_BYTES * largest_base + 8 * largest_adapter)
    return Needs(
        params, adapter, ddp_state_bytes(params), fsdp, fsdp_finer,
        {b: b * base + adapter_ddp for b in (WEIGHT_BYTES, BF16_BYTES)},
        {b: (b * base + TRAINED_BYTES * adapter) / gpus + in_flight
         for b in (WEIGHT_BYTES, BF16_BYTES)},
        full_act, lora_act,
    )  # fmt: skip


def table(args: argparse.Namespace) -> None:
    sizes, parts, totals, notes = [], [], [], []
    for family in FAMILIES:
        n = needs(family, args.batch_size, args.gpus)
        full, lora = n.full_act, n.lora_act
        tokens, width = family.text
        size = family.resolution // 8
        encoders = " + ".join(f"{e} {encoder_parameters(e) / 1e6:,.0f}M" for e in family.encoders)
        sizes.append([
            family.title, f"{family.network_class.__name__} ({family.source})", f"{n.params:,}",
            family.published,
            f"{family.resolution}px: {size}x{size}x{family.latent_channels}, "
            f"{tokens} x {width} text", f"{n.adapter:,}", encoders,
            f"{vae_parameters(family.vae) / 1e6:,.1f}M",
        ])  # fmt: skip
        if n.fsdp_finer < n.fsdp:
            notes.append(f"{family.title}: {n.fsdp_finer / GiB:.3g}")
        g = {k: v / GiB for k, v in full.items()} | {f"lora_{k}": v / GiB for k, v in lora.items()}
        parts.append([
            family.title, n.ddp / GiB, n.fsdp / GiB, n.lora_ddp[4] / GiB, n.lora_ddp[2] / GiB,
            n.lora_fsdp[4] / GiB, g["all"], g["checkpointed"], g["lora_all"],
            g["lora_checkpointed"], g["copies"], g["lora_copies"],
        ])  # fmt: skip
        totals.append([
            family.title,
            (n.ddp + full["all"] + full["copies"]) / GiB,
            (n.ddp + full["checkpointed"] + full["copies"]) / GiB,
            (n.fsdp + full["checkpointed"]) / GiB,
            (n.lora_ddp[4] + lora["all"] + lora["copies"]) / GiB,
            (n.lora_ddp[4] + lora["checkpointed"] + lora["copies_checkpointed"]) / GiB,
            (n.lora_ddp[2] + lora["all"]) / GiB,
            (n.lora_ddp[2] + lora["checkpointed"]) / GiB,
            (n.lora_fsdp[4] + lora["checkpointed"]) / GiB,
        ])  # fmt: skip
    print(f"Arithmetic at {git_revision()} ({tree_state()}); LoRA: rank {LORA_RANK} on "
          f"{', '.join(ATTENTION_PROJECTIONS)}\n")  # fmt: skip
    print_table(
        ["family", "denoiser (config of)", "parameters (built)", "published", "input per image",
         f"LoRA r{LORA_RANK} parameters", "text encoders (off the device)", "VAE"],
        sizes,
    )  # fmt: skip
    print(
        f"\nParts, GiB per GPU: model state ({args.gpus} GPUs for FSDP2), activations at batch "
        f"{args.batch_size} per GPU in bf16, autocast's bf16 copies of fp32 weights (DDP)\n"
    )
    print_table(
        ["family", "full: state DDP", f"full: state FSDP2/{args.gpus}",
         "LoRA: state DDP, fp32 base", "LoRA: state DDP, bf16 base",
         f"LoRA: state FSDP2/{args.gpus}, fp32 base", "full: activations",
         "full: activations, checkpointed", "LoRA: activations",
         "LoRA: activations, checkpointed", "full: copies", "LoRA fp32 base: copies"],
        parts,
    )  # fmt: skip
    print(
        f"\nA full fine-tune's state under FSDP2/{args.gpus} (GiB) with a UNet's resnets and "
        f"transformer blocks as units, not its down, mid and up blocks: {'; '.join(notes)}"
    )
    print(
        f"\nTotals, GiB per GPU (state + activations + copies), batch {args.batch_size} per "
        f"GPU, bf16 compute; ckpt: gradient checkpointing\n"
    )
    print_table(
        ["family", "full DDP", "full DDP + ckpt", f"full FSDP2/{args.gpus} + ckpt",
         "LoRA DDP, fp32 base", "LoRA DDP + ckpt, fp32 base", "LoRA DDP, bf16 base",
         "LoRA DDP + ckpt, bf16 base", f"LoRA FSDP2/{args.gpus} + ckpt, fp32 base"],
        totals,
    )  # fmt: skip


# The measured pipeline's UNet: Stable Diffusion 1.x's layout at a fifth of its width, attending
# to the tiny CLIP's 32-wide embeddings, on 32x32x4 latents (64x64 images, a VAE of factor 2).
MEASURED_UNET = {**SD15_UNET, "block_out_channels": [64, 128, 256, 256],
                 "cross_attention_dim": 32, "sample_size": 32}  # fmt: skip
MEASURED_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": [8, 8],
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
                "latent_channels": 4, "norm_num_groups": 4, "sample_size": 64}  # fmt: skip
# Stable Diffusion 1.x's scheduler config, as its repositories ship it.
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}  # fmt: skip
MEASURED_RESOLUTION = 64


def measured_pipeline(folder: Path) -> Path:
    """A StableDiffusionPipeline folder of random parts: MEASURED_UNET, MEASURED_VAE, the
    tiny CLIP and its tokenizer, Stable Diffusion's scheduler."""
    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_clip()
    StableDiffusionPipeline(
        vae=AutoencoderKL(**MEASURED_VAE), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**MEASURED_UNET), scheduler=PNDMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure_one(args: argparse.Namespace) -> None:
    """One fine-tune in this process; its memory and file sizes as one JSON line."""
    out = Path(args.output_dir)
    argv = [
        "--init-from", args.base, "--dataset", "digits-captioned", "--channels", "3",
        "--resolution", str(MEASURED_RESOLUTION), "--max-images", "16",
        "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
        "--lr-warmup-steps", "0", "--log-every", "1", "--checkpoint-every", "100000",
        "--sample-every", "0", "--num-sample-images", "1", "--sample-steps", "1",
        "--report-to", "none", "--resume", "none", "--output-dir", str(out),
        *([] if args.lora_rank is None else ["--lora-rank", str(args.lora_rank)]),
    ]  # fmt: skip
    peaks = train_tracking_memory(argv)
    checkpoints = sorted((out / "checkpoints").iterdir())
    print(json.dumps({**peaks, "checkpoint": folder_bytes(checkpoints[-1]),
                      "export": folder_bytes(out / "pipeline")}), flush=True)  # fmt: skip


def predicted(lora: bool, batch: int) -> dict[str, int]:
    """The arithmetic for the measured run, one process in fp32: what training adds to the
    loaded network (gradients 4, AdamW 8, EMA 4 bytes per trained parameter, and the
    activations of one forward at the batch, counted as the table counts them), and the
    checkpoint's tensors (weights, EMA, AdamW: 16 bytes per trained parameter)."""
    with torch.device("meta"):
        net = UNet2DConditionModel(**MEASURED_UNET)
    if lora:
        net = with_lora(net)
    trained = num_params(net, trainable_only=True)
    size = MEASURED_UNET["sample_size"]
    x = torch.empty(batch, 4, size, size, device="meta")
    text = torch.empty(batch, TINY_CLIP_MAX_LENGTH, MEASURED_UNET["cross_attention_dim"],
                       device="meta")  # fmt: skip
    act = count_saved(net, [], lambda: net(x, torch.zeros(batch, device="meta"), text))["all"]
    state = (GRAD_BYTES + ADAMW_BYTES + EMA_BYTES) * trained
    return {"parameters": num_params(net) - (trained if lora else 0), "trained": trained,
            "state": state, "activations": act, "adds": state + act,
            "checkpoint": (WEIGHT_BYTES + EMA_BYTES + ADAMW_BYTES) * trained}  # fmt: skip


def measure(args: argparse.Namespace) -> None:
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="finetune_memory_"))
    base = measured_pipeline(work / "base")
    rows = []
    for name, rank in (("full", None), (f"LoRA r{LORA_RANK}", LORA_RANK)):
        command = [sys.executable, __file__, "measure-one", "--base", str(base),
                   "--output-dir", str(work / name.split()[0].lower()),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   *([] if rank is None else ["--lora-rank", str(rank)])]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} run failed:\n{done.stderr[-4000:]}")
        got = json.loads(done.stdout.strip().splitlines()[-1])
        want = predicted(rank is not None, args.batch_size)
        adds = got["training"] - got["prepared"]
        rows.append([
            name, f"{want['trained']:,}", got["prepared"] / GiB, got["forward"] / GiB,
            got["training"] / GiB, adds / GiB, want["state"] / GiB, want["activations"] / GiB,
            want["adds"] / GiB,
            got["checkpoint"] / 2**20, want["checkpoint"] / 2**20, got["export"] / 2**20,
        ])  # fmt: skip
    print(f"Measured at {git_revision()} ({tree_state()}) on {machine()}; UNet of "
          f"{want['parameters']:,} parameters, batch {args.batch_size}, {args.steps} steps, fp32, "
          f"one process\n")  # fmt: skip
    print_table(
        ["run", "trained parameters", "resident at prepare (GiB)",
         "highest at a forward's end (GiB)", "peak, training (GiB)",
         "training adds (GiB)", "predicted: gradients + AdamW + EMA (GiB)",
         "predicted: activations (GiB)", "predicted: adds (GiB)", "checkpoint (MiB)",
         "predicted: checkpoint tensors (MiB)", "export (MiB)"],
        rows,
    )  # fmt: skip


def copies(args: argparse.Namespace) -> None:
    """The copies column checked: what autograd saves in one forward of the measured UNet,
    counted on the meta device with bf16 weights (activations, and the parameters saved:
    the copies), against a real forward on this CPU under bf16 autocast with fp32 weights
    (everything it saves: activations and autocast's copies)."""
    rows = []
    size = MEASURED_UNET["sample_size"]
    text_shape = (args.batch_size, TINY_CLIP_MAX_LENGTH, MEASURED_UNET["cross_attention_dim"])
    for name, lora in (("full", False), (f"LoRA r{LORA_RANK}", True)):
        with torch.device("meta"):
            net = UNet2DConditionModel(**MEASURED_UNET)
        net = (with_lora(net) if lora else net).to(torch.bfloat16)
        x = torch.empty(args.batch_size, 4, size, size, device="meta", dtype=torch.bfloat16)
        text = torch.empty(*text_shape, device="meta", dtype=torch.bfloat16)
        t = torch.zeros(args.batch_size, device="meta")
        counted = count_saved(net, [], partial(net, x, t, text))
        torch.manual_seed(0)
        real = UNet2DConditionModel(**MEASURED_UNET)
        real = with_lora(real) if lora else real
        x, text = torch.randn(args.batch_size, 4, size, size), torch.randn(*text_shape)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved = count_saved(real, [], partial(real, x, torch.zeros(args.batch_size), text))
        rows.append([name, counted["all"] / 2**20, counted["params_outside"] / 2**20,
                     (counted["all"] + counted["params_outside"]) / 2**20,
                     (saved["all"] + saved["params_outside"]) / 2**20])  # fmt: skip
    print(f"At {git_revision()} ({tree_state()}); the measured UNet, batch {args.batch_size}\n")
    print_table(
        ["run", "counted: activations (MiB)", "counted: copies (MiB)", "counted: both (MiB)",
         "saved under autocast, fp32 weights (MiB)"],
        rows,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="per-GPU memory of each family, full and LoRA, by arithmetic")
    t.add_argument("--gpus", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=4, help="per GPU")
    m = sub.add_parser("measure", help="full against LoRA fine-tune steps on this CPU")
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--output-dir", default=None, help="default: a new temporary folder")
    c = sub.add_parser("copies", help="autocast's weight copies: counted against a real forward")
    c.add_argument("--batch-size", type=int, default=2)
    one = sub.add_parser("measure-one", help="one of measure's runs, in this process")
    one.add_argument("--base", required=True)
    one.add_argument("--output-dir", required=True)
    one.add_argument("--batch-size", type=int, default=4)
    one.add_argument("--steps", type=int, default=3)
    one.add_argument("--lora-rank", type=int, default=None)
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # its note on casting meta networks to bf16
    torch.set_grad_enabled(True)
    {"table": table, "measure": measure, "copies": copies, "measure-one": measure_one}[
        args.command
    ](args)


if __name__ == "__main__":
    main()
