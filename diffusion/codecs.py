"""The codec of a model: what maps images to the space the diffusion runs in, and back.

A model is a backbone, a formulation (its kind) and a codec. Pixel models have none; a latent
model (`train_ddpm.py --vae`) has a frozen diffusers `AutoencoderKL`: training batches carry
its latents z = (posterior sample - shift) * scale (per channel, (x - latents_mean) *
scaling_factor / latents_std, where the VAE's config has those: Playground v2.5's and other
SDXL-family VAEs'), the samplers draw latents, and a draw
decodes them (`decoding`), so the grids, `sample.py`, `--eval-every` FID and the model card all
show images. The export ships the VAE as its `vae/` component, whose config holds the scale
that training used (measured on the data when the VAE's own config has none).

Loading refuses, before any work: a folder that is not an `AutoencoderKL`, weights only as a
pickle, and (`check_against`) a VAE whose channels or downsampling disagree with the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from ddp_utils.errors import InputError
from diffusion.pipeline_code.core import decode_latents

logger = logging.getLogger("ddp_diffusion")

VAE_CLASS = "AutoencoderKL"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ENCODE_CHUNK = 64  # images per VAE forward when the latent cache is built
DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}  # fmt: skip


def vae_folder(path: Path) -> Path:
    """The folder holding the AutoencoderKL: `path` itself, or a pipeline's `vae/`."""
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return path / "vae"
    return path


def check_vae_folder(folder: Path) -> dict[str, Any]:
    """The config of the AutoencoderKL in `folder` (as written on disk), or an InputError
    naming what is wrong and what to give instead."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(
            f"{folder} is not a diffusers AutoencoderKL folder (no config.json): give the "
            "folder an AutoencoderKL's save_pretrained wrote (train_autoencoder.py's export, "
            "or a pipeline's vae/ subfolder) or a hub id of one"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config_path} cannot be read as JSON: {err}") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != VAE_CLASS:
        raise InputError(
            f"{folder} holds a {name or 'model of unknown class'}, not an {VAE_CLASS} "
            "(its config.json's _class_name): give an AutoencoderKL folder (train_autoencoder.py's "
            "export, or a pipeline's vae/ subfolder)"
        )
    if not (folder / WEIGHTS_NAME).is_file():
        if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")) or any(folder.glob("*.pt")):
            raise InputError(
                f"{folder} holds its weights only as a pickle (.bin/.ckpt/.pt), which can run "
                "code when loaded; this toolkit reads safetensors only. Convert it once, if you "
                "trust it: load it with diffusers' AutoencoderKL.from_pretrained, then "
                f"save_pretrained it ({WEIGHTS_NAME}, diffusers' default)"
            )
        raise InputError(f"{folder} has no {WEIGHTS_NAME}: an incomplete AutoencoderKL folder")
    return config


def weights_sha256(folder: Path) -> str:
    """The hash of the VAE's weights file: what the latent cache and resume compare."""
    digest = hashlib.sha256()
    with open(folder / WEIGHTS_NAME, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LatentCodec:
    """A frozen AutoencoderKL in eval mode, and the affine map its latents are trained in:
    z = (latent - shift_factor) * scaling_factor (Rombach et al. 2022, sec. 4.3.2), or per
    channel z = (latent - latents_mean) * scaling_factor / latents_std when its config has
    those (as diffusers' SDXL pipelines read them; shift_factor is then unused)."""

    vae: AutoencoderKL
    source: str  # what --vae named (a folder or a hub id)
    folder: Path  # where its files are
    sha256: str  # of the weights file (as --vae gave it: a copy in an export keeps it)
    scaling_factor: float | None  # None until measured on the data (`set_scale`)
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None  # per latent channel, from the config
    latents_std: tuple[float, ...] | None = None

    @property
    def per_channel(self) -> bool:
        return self.latents_mean is not None

    @property
    def plain_scale(self) -> bool:
        """z = latent * scaling_factor, the map diffusers' DiTPipeline decodes with."""
        return not self.per_channel and not self.shift_factor

    def affine(self, device: torch.device | str) -> tuple[Any, Any]:
        """(shift, scale) with z = (latent - shift) * scale: floats, or (C, 1, 1) float32
        tensors on `device` for per-channel statistics."""
        assert self.scaling_factor is not None, "the scale is measured before training"
        if not self.per_channel:
            return self.shift_factor, self.scaling_factor
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=device)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=device)
        return mean.view(-1, 1, 1), (self.scaling_factor / std).view(-1, 1, 1)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        """Channels of the images the VAE takes."""
        return int(self.vae.config.in_channels)

    def latent_shape(self, resolution: int) -> tuple[int, int]:
        """(latent channels, latent side) of images of `resolution`."""
        return int(self.vae.config.latent_channels), resolution // self.downsampling

    @property
    def fingerprint(self) -> str:
        """What the latent cache is keyed by (with the data's fingerprint): weights and dtype."""
        return f"{self.sha256[:24]}-{str(self.vae.dtype).removeprefix('torch.')}"

    def to(self, device: torch.device | str) -> LatentCodec:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation (float32, on the CPU) of float images in
        [-1, 1] (N, C, H, W), encoded in chunks in the VAE's dtype on its device."""
        device = self.vae.device
        means, stds = [], []
        for start in range(0, len(images), ENCODE_CHUNK):
            part = images[start : start + ENCODE_CHUNK].to(device, self.vae.dtype)
            posterior = self.vae.encode(part).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (float32 on the CPU) of scaled latents; in fixed-size chunks, so
        an image does not depend on the batch it was drawn in (the shipped pipeline's code)."""
        images = decode_latents(self.vae, latents.to(self.vae.device))
        return images.clamp(-1.0, 1.0).cpu()

    def set_scale(self, scaling_factor: float) -> None:
        """Record the scale on the codec and in the VAE's config (the export ships it)."""
        self.scaling_factor = float(scaling_factor)
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.vae.register_to_config(shift_factor=self.shift_factor or None)

    def set_channel_statistics(
        self, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> None:
        """Use (and record in the VAE's config) these per-channel statistics, or none: what a
        checkpoint was trained with, whatever the config says now."""
        self.latents_mean = None if mean is None else tuple(float(v) for v in mean)
        self.latents_std = None if std is None else tuple(float(v) for v in std)
        self.vae.register_to_config(
            latents_mean=None if mean is None else list(self.latents_mean),
            latents_std=None if std is None else list(self.latents_std),
        )

    def ship(self, folder: Path) -> None:
        """Make an export's `vae/` (written by the pipeline's save_pretrained, with the scale
        in its config) hold the weights file --vae gave, byte for byte: not the copy in the
        training precision, and the same sha256."""
        shutil.copyfile(self.folder / WEIGHTS_NAME, folder / WEIGHTS_NAME)

    def facts(self) -> dict[str, Any]:
        """What task.json and checkpoints record of the codec (resume compares `sha256`)."""
        return {
            "vae": self.source,
            "sha256": self.sha256,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": self.latents_mean,
            "latents_std": self.latents_std,
            "latent_channels": int(self.vae.config.latent_channels),
            "downsampling": self.downsampling,
            "image_channels": self.channels,
        }


def load_codec(
    folder: Path, source: str | None = None, dtype: torch.dtype = torch.float32
) -> LatentCodec:
    """The AutoencoderKL in `folder` (or its `vae/`), checked, frozen, in eval mode, in `dtype`
    (float32 where its config asks to be upcast: `force_upcast`). The scale is its config's
    `scaling_factor`, or None when the config on disk has none (then measured on the data)."""
    folder = vae_folder(Path(folder))
    config = check_vae_folder(folder)
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{folder} cannot be loaded as an AutoencoderKL: {err}") from None
    if config.get("force_upcast", True) and dtype == torch.float16:
        dtype = torch.float32  # its config says fp16 overflows it (SD's VAE does)
    vae.requires_grad_(False)
    vae.eval()
    if dtype != vae.dtype:
        vae.to(dtype=dtype)
    scale = config.get("scaling_factor")
    return LatentCodec(
        vae,
        source or str(folder),
        folder,
        weights_sha256(folder),
        None if scale is None else float(scale),
        float(config.get("shift_factor") or 0.0),
        *channel_statistics(config, folder),
    )


def channel_statistics(
    config: Mapping[str, Any], folder: Path
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The config's per-channel `latents_mean` and `latents_std` (both or neither), checked:
    one positive std and one mean per latent channel."""
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None and std is None:
        return None, None
    channels = config.get("latent_channels")
    problem = None
    if mean is None or std is None:
        problem = "has one of latents_mean and latents_std without the other"
    elif len(mean) != channels or len(std) != channels:
        problem = (f"has {len(mean)} latents_mean and {len(std)} latents_std values for "
                   f"{channels} latent channels")  # fmt: skip
    elif min(std) <= 0:
        problem = "has a latents_std that is not positive"
    if problem:
        raise InputError(
            f"{folder / 'config.json'} {problem}: give one value per latent channel in both "
            "(the posterior's mean and standard deviation over the data), or remove both"
        )
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def codec_from_export(folder: Path, facts: Mapping[str, Any] | None = None) -> LatentCodec | None:
    """The `vae/` component of an export (its config holds the scale training used); `facts`:
    what its task.json records of it (the --vae it was trained with)."""
    if not (folder / "vae").is_dir():
        return None
    codec = load_codec(folder / "vae", (facts or {}).get("vae"))
    if codec.scaling_factor is None:
        raise InputError(f"{folder / 'vae'} has no scaling_factor in its config.json")
    return codec


def check_against(codec: LatentCodec, channels: int, resolution: int) -> list[str]:
    """What disagrees between the VAE and the data (channels, size), each with its fix."""
    problems = []
    if codec.channels != channels:
        problems.append(
            f"the VAE encodes {codec.channels}-channel images and the data has {channels}: "
            f"pass --channels {codec.channels} (or a VAE trained on {channels}-channel images)"
        )
    factor = codec.downsampling
    if resolution % factor or resolution // factor < 1:
        problems.append(
            f"the VAE downsamples by {factor} ({len(codec.vae.config.block_out_channels)} "
            f"levels) and --resolution {resolution} is not a multiple of it: pass --resolution "
            f"{max(factor, resolution // factor * factor)}"
        )
    return problems


def measured_scale(variance: float) -> float:
    """1 / the standard deviation of posterior samples over the data, from their variance
    Var(mean) + E[std^2] (Rombach et al. 2022 take 1 / std of one batch of samples)."""
    return 1.0 / math.sqrt(max(variance, 1e-24))


def codec_changes(saved: Mapping[str, Any] | None, codec: LatentCodec | None) -> list[str]:
    """How a checkpoint's codec (its state's `latent`) differs from this run's, in words."""
    if saved is None and codec is None:
        return []
    if saved is None:
        return [f"it was trained on pixels (no --vae); this run gives --vae {codec.source}"]
    if codec is None:
        return [f"it was trained on the latents of --vae {saved.get('vae')}; this run gives none"]
    if saved.get("sha256") != codec.sha256:
        return [
            f"it was trained with the VAE {saved.get('vae')} (weights sha256 "
            f"{str(saved.get('sha256'))[:12]}...), this run gives {codec.source} (sha256 "
            f"{codec.sha256[:12]}...)"
        ]
    return []
