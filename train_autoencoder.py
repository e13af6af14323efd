r"""Train an autoencoder (a diffusers AutoencoderKL): the codec a latent diffusion model uses.

Loss: reconstruction (L1 by default, or MSE) + --kl-weight x KL of the posterior to N(0, I),
on the same training loop as the diffusion models (resume, checkpoints, logging, DDP). The last
--num-holdout images of the dataset are never trained on: the logged grids show them over
their reconstructions, and the export's reconstruction.json gives their PSNR and SSIM.
No perceptual (LPIPS) or adversarial term: no package here ships LPIPS weights offline.

    # the digits at 32x32 -> 8x8x4 latents, ~10 minutes on one CPU core:
    python train_autoencoder.py --resolution 32 --output-dir runs/ae-digits
    # the Stable Diffusion VAE's shape (8x downsampling, 4 latent channels), on GPUs:
    python train_autoencoder.py --preset sd-vae --dataset path/to/images --resolution 256 \
        --mixed-precision bf16 --output-dir runs/sd-vae
    # two processes on one machine (CPU, gloo); see the README for GPUs and nodes:
    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \
        train_autoencoder.py --resolution 32 --max-steps 200
    # the export (runs/ae-digits/model) is a diffusers AutoencoderKL folder:
    #   AutoencoderKL.from_pretrained("runs/ae-digits/model", use_safetensors=True),
    #   or a latent run's --vae

Rerunning the same command resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries below load (~10 s): exit 130 quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

from dataclasses import dataclass
from typing import Literal

from ddp_utils import loop
from ddp_utils.cli import cli_main
from ddp_utils.config import option, parse_config, require
from ddp_utils.data import hold_out_last
from ddp_utils.run import Run, start_run
from ddp_utils.train_config import TrainConfig
from diffusion.autoencoder.method import (
    AutoencoderMethod,
    ReconstructionLoss,
    TrainingAutoencoderKL,
)
from diffusion.autoencoder.presets import AutoencoderPreset, build_autoencoder, downsampling_factor

SECTION = "Autoencoder"


@dataclass
class AutoencoderConfig(TrainConfig):
    """An AutoencoderKL; defaults train the digits preset in ~10 minutes on one CPU core."""

    preset: AutoencoderPreset = option(
        "ae-digits",
        "ae-digits: 3 blocks (16, 32, 64 channels), 4x downsampling, 4 latent channels (0.7M "
        "parameters); sd-vae: Stable Diffusion's VAE shape, 8x downsampling, 4 latent channels "
        "(83.7M)",
        section=SECTION,
    )
    reconstruction_loss: ReconstructionLoss = option(
        "l1",
        "per-pixel reconstruction error: l1 (as LDM's autoencoders: sharper "
        "edges than mse, which averages plausible images into a blur) or mse; there is no "
        "perceptual (LPIPS) term: no package here ships its weights offline",
        section=SECTION,
    )
    kl_weight: float = option(
        1e-6,
        "weight of KL(posterior || N(0, I)) in LDM's units (a sum over latents against a sum "
        "over pixels); small: it keeps the latents bounded, the scaling factor does the rest",
        section=SECTION,
    )
    num_holdout: int = option(
        64,
        "the dataset's last N images are held out of training: the grids and PSNR/SSIM",
        section=SECTION,
    )
    output_dir: str = option("runs/autoencoder", "run directory: checkpoints, export, logs")
    max_steps: int = option(2000, "number of optimizer steps")
    batch_size: int = option(32, "per-device batch size")
    learning_rate: float = option(1e-3, "peak learning rate")
    lr_schedule: Literal["constant", "cosine"] = option("cosine", "after warmup")
    lr_warmup_steps: int = option(100, "linear warmup, in optimizer steps")
    use_ema: bool = option(False, "keep an EMA of the weights (used for grids and the export)")
    num_sample_images: int = option(
        32, "held-out images (and their reconstructions) in each logged grid"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.kl_weight >= 0, f"--kl-weight must be >= 0, got {self.kl_weight}")
        require(
            self.eval_every == 0,
            "--eval-every scores generated samples (FID); an autoencoder generates none: drop "
            "it (held-out PSNR/SSIM are measured at the export, reconstruction.json)",
        )
        require(
            self.num_sample_images <= self.num_holdout,
            f"--num-sample-images ({self.num_sample_images}) shows held-out images: it must be "
            f"at most --num-holdout ({self.num_holdout})",
        )

    def check_image_size(self) -> None:
        super().check_image_size()
        factor = downsampling_factor(self.preset)
        require(
            self.resolution is None or self.resolution % factor == 0,
            f"--resolution must be divisible by {factor} for --preset {self.preset} (it "
            f"downsamples {factor}x), got {self.resolution}: use "
            f"{max(factor, self.resolution // factor * factor) if self.resolution else factor} "
            f"or {(self.resolution // factor + 1) * factor if self.resolution else 2 * factor}",
        )


def train(cfg: AutoencoderConfig) -> Run:
    run = start_run(cfg)
    cfg.freeze()
    run.data, held_out = hold_out_last(run.data, cfg.num_holdout)
    model = build_autoencoder(cfg.preset, cfg.resolution, cfg.channels, TrainingAutoencoderKL)
    method = AutoencoderMethod(run, held_out, cfg.preset, cfg.reconstruction_loss, cfg.kl_weight)
    loop.train(run, method, model)
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(AutoencoderConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
