"""The autoencoder as a method of the training loop: its loss, pictures, figures and export.

Loss per image: LDM's autoencoder loss (Rombach et al. 2022, section 3.1) without its
perceptual and GAN terms, divided by the number of pixel values C*H*W so that the
reconstruction term reads as a mean error per pixel (the same `kl_weight` as LDM's):

    mean over pixels of |x - D(z)| (or (x - D(z))^2)  +  kl_weight * KL(q(z|x) || N(0, I)) / (C*H*W)

with z ~ q(z|x) = N(mean(x), diag(exp(logvar(x)))) drawn from the step's seeded generator.
There is no perceptual (LPIPS) or adversarial term: LPIPS needs VGG/AlexNet weights that no
package here ships (torchvision downloads them at run time), and a GAN term is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn

from ddp_utils.data import Batch, to_float
from ddp_utils.files import write_json
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from ddp_utils.run import Run
from diffusion.autoencoder.presets import downsampling_factor
from diffusion.autoencoder.quality import psnr, ssim
from diffusion.kinds.registry import AUTOENCODER_TASK

VALUE_RANGE = (-1.0, 1.0)  # what Stable Diffusion's VAE sees, and what a latent model decodes to
RECONSTRUCTION_FILE = "reconstruction.json"
ReconstructionLoss = Literal["l1", "mse"]
PER_ROW = 8  # grid: a row of held-out inputs, the row of their reconstructions below it
NUM_SCALING_IMAGES = 1024  # training images whose latents measure the scaling factor


class TrainingAutoencoderKL(AutoencoderKL):
    """An `AutoencoderKL` whose forward returns what the loss needs: (reconstruction, KL per
    image), the latents sampled with `generator`. Under DDP the loss must come from one call of
    forward (gradients are synchronised for what forward computed), and `AutoencoderKL.forward`
    drops the posterior. Same weights and config: the export is a plain `AutoencoderKL`."""

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.encode(images).latent_dist
        latents = posterior.sample(generator=generator)
        return self.decode(latents).sample, posterior.kl()


@torch.no_grad()
def reconstruct(net: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean of `images` (float NCHW in VALUE_RANGE), clamped to it."""
    return net.decode(net.encode(images).latent_dist.mode()).sample.float().clamp(*VALUE_RANGE)


class AutoencoderMethod:
    """Reconstruction + KL; held-out images (the dataset's last ones) for pictures and figures."""

    value_range = VALUE_RANGE
    export_name = "model"

    def __init__(
        self,
        run: Run,
        held_out: torch.Tensor,
        preset: str,
        reconstruction_loss: ReconstructionLoss,
        kl_weight: float,
    ) -> None:
        self.run = run
        self.device = run.accelerator.device
        self.held_out = held_out  # uint8 NCHW, never trained on
        self.preset = preset
        self.reconstruction_loss = reconstruction_loss
        self.kl_weight = kl_weight
        self._card: CardFacts | None = None

    def shard_units(self, net: nn.Module) -> tuple[str, ...]:
        return ()  # not sharded: --sharding none

    def task_info(self) -> dict[str, Any]:
        return {
            "task": AUTOENCODER_TASK,
            "value_range": list(VALUE_RANGE),
            "downsampling_factor": downsampling_factor(self.preset),
        }

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        x = batch.images
        reconstruction, kl = model(x, generator=generator)
        error = reconstruction.float() - x
        error = error.abs() if self.reconstruction_loss == "l1" else error.square()
        per_image = error.flatten(1).mean(1)
        kl = kl.float()
        stats.report("reconstruction", per_image)
        stats.report("kl", kl)  # nats per image
        return (per_image + self.kl_weight * kl / x[0].numel()).mean()

    def held_out_floats(self, indices: range | slice) -> torch.Tensor:
        images = self.held_out[indices.start : indices.stop].to(self.device)
        return to_float(images, VALUE_RANGE, None)

    def sample(self, net: nn.Module, indices: range) -> torch.Tensor:
        """Item k: the reconstruction of held-out image k."""
        return reconstruct(net, self.held_out_floats(indices)).cpu()

    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        return {}

    def data_pictures(self) -> dict[str, np.ndarray]:
        return {}

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """Rows of up to 8 held-out inputs, each over the row of their reconstructions."""
        inputs = self.held_out[: len(images)].permute(0, 2, 3, 1).numpy()
        per_row = min(PER_ROW, len(images))
        rows = []
        for start in range(0, len(images), per_row):
            for part in (inputs, images):
                row = part[start : start + per_row]
                blank = np.zeros((per_row - len(row), *row.shape[1:]), np.uint8)
                rows.append(np.concatenate([row, blank]))
        return np.concatenate(rows), per_row

    def grid_rows(self, num_images: int) -> list[str]:
        return []

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A diffusers `AutoencoderKL` folder with the latents' scaling factor in its config,
        and `reconstruction.json`: PSNR/SSIM of the held-out images (also logged, and added to
        the card, which the loop writes after this)."""
        vae = AutoencoderKL.from_config(dict(net.config))
        vae.load_state_dict(net.state_dict())
        vae.to(self.device).eval()
        vae.register_to_config(scaling_factor=self.scaling_factor(vae))
        figures = self.reconstruction_figures(vae)
        vae.save_pretrained(folder, safe_serialization=True)
        write_json(folder / RECONSTRUCTION_FILE, figures)
        self.run.tracker.log(
            {"holdout_psnr": figures["psnr"], "holdout_ssim": figures["ssim"]},
            self.run.cfg.max_steps,
        )
        if self._card is not None:
            self._card.facts += [
                ("held-out PSNR", f"{figures['psnr']:.2f} dB ({figures['num_images']} images)"),
                ("held-out SSIM", f"{figures['ssim']:.4f}"),
                ("latent scaling factor", f"{vae.config.scaling_factor:.5f}"),
            ]

    @torch.no_grad()
    def scaling_factor(self, vae: AutoencoderKL) -> float:
        """1 / std of the posterior means of (up to 1024) training images: latents times it
        have unit variance, as a latent diffusion model expects (LDM, section 4.3.2)."""
        images = self.run.data.images[:NUM_SCALING_IMAGES]
        means = []
        for chunk in images.split(64):
            x = to_float(chunk.to(self.device), VALUE_RANGE, None)
            means.append(vae.encode(x).latent_dist.mean.float().cpu())
        return float(1 / torch.cat(means).std())

    def reconstruction_figures(self, vae: AutoencoderKL) -> dict[str, Any]:
        """Mean PSNR (dB) and SSIM of the held-out images and their reconstructions, in [0, 1]."""
        scores = []
        for start in range(0, len(self.held_out), 64):
            x = self.held_out_floats(slice(start, start + 64))
            y = reconstruct(vae, x)
            x01, y01 = (x + 1) / 2, (y + 1) / 2
            scores.append(torch.stack([psnr(x01, y01), ssim(x01, y01)], 1).cpu())
        means = torch.cat(scores).mean(0).tolist()
        return {"psnr": means[0], "ssim": means[1], "num_images": len(self.held_out)}

    def card(self) -> CardFacts:
        cfg = self.run.cfg
        factor = downsampling_factor(self.preset)
        side = cfg.resolution // factor
        channels = "" if cfg.channels == 3 else f" ({cfg.channels} channel)"
        self._card = CardFacts(
            title=f"Autoencoder (AutoencoderKL, {self.preset}) on {cfg.dataset}",
            summary=(
                f"A diffusers AutoencoderKL that encodes {cfg.resolution}x{cfg.resolution} "
                f"images{channels} into {side}x{side}x4 latents ({factor}x smaller per side) and "
                "decodes them back; the codec of a latent diffusion model. It does not "
                "generate images by itself."
            ),
            script="train_autoencoder.py",
            sampler=(
                "Give the folder to a latent diffusion run as `--vae <folder>`. Latents are "
                "`encode(x).latent_dist.sample() * config.scaling_factor`, images "
                "`decode(z / config.scaling_factor)`, pixels in [-1, 1]."
            ),
            how_to_load=(
                "from diffusers import AutoencoderKL\n"
                'vae = AutoencoderKL.from_pretrained("path/to/this/folder", use_safetensors=True)\n'
                "latents = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor"
            ),
            facts=[
                (
                    "objective",
                    f"{self.reconstruction_loss.upper()} reconstruction + "
                    f"{self.kl_weight:g} x KL per pixel",
                ),
                ("latents", f"{side}x{side}x4 ({factor}x downsampling)"),
            ],  # fmt: skip
            tags=["autoencoder", "vae"],
            generates=False,
            grid_caption="Held-out images (rows 1, 3, ...) over their reconstructions.",
        )
        return self._card
