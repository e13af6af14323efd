r"""Train the basic diffusion model: a network that undoes a blend of images with uniform noise.

x_noisy = (1 - amount) * x + amount * U[0,1) noise, amount ~ U[0,1) per image; the network
predicts x (MSE). Sampling starts from uniform noise and moves 1/(n-i) of the way toward the
prediction at step i.

    # one process (CPU or one GPU), built-in digits, ~2 minutes on a 2-core CPU:
    python train_basic.py
    # with a diffusers UNet2DModel instead of the small hand-written UNet:
    python train_basic.py --model unet --output-dir runs/basic-unet
    # two processes on one machine (CPU, gloo); see the README for GPUs and nodes:
    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \
        train_basic.py --max-steps 200
    # sample from the export:
    python sample.py runs/basic/model --num-samples 64 --output-dir runs/basic/samples

Rerunning the same command resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries below load (~10 s): exit 130 quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddp_utils import loop
from ddp_utils.cli import cli_main
from ddp_utils.config import option, parse_config, require
from ddp_utils.data import Batch, to_float
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from ddp_utils.run import Run, start_run
from ddp_utils.train_config import TrainConfig
from diffusion.basic import VALUE_RANGE, corrupt, sample_basic
from diffusion.models import build_basic_model, predict
from evaluation.during_training import training_evaluator


@dataclass
class BasicConfig(TrainConfig):
    """The basic model; defaults train readable digits in ~2 minutes on 2 CPU cores."""

    model: Literal["basic", "unet"] = option(
        "basic", "basic: a small 3-level UNet (309k parameters); unet: a diffusers UNet2DModel"
    )
    optimizer: Literal["adam", "adamw"] = option("adam", "optimizer")
    output_dir: str = option("runs/basic", "run directory: checkpoints, export, samples, logs")
    batch_size: int = option(128, "per-device batch size")
    max_steps: int = option(1500, "number of optimizer steps")
    sample_steps: int = option(40, "sampler steps for the logged grids (5 to 50 work)")
    use_ema: bool = option(False, "keep an EMA of the weights (used for samples and the export)")

    def check_image_size(self) -> None:
        super().check_image_size()
        require(
            self.resolution is None or self.resolution % 4 == 0,
            f"--resolution must be divisible by 4 for these UNets (2 downsamplings), "
            f"got {self.resolution}",
        )


class BasicMethod:
    """Predict the clean image from a blend with uniform noise (MSE)."""

    value_range = VALUE_RANGE
    export_name = "model"

    def __init__(self, run: Run) -> None:
        self.run = run
        self.device = run.accelerator.device

    def task_info(self) -> dict[str, Any]:
        return {"task": "basic", "value_range": list(VALUE_RANGE)}

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        x = batch.images
        amount = torch.rand(x.shape[0], generator=generator, device=x.device)
        noise = torch.rand(x.shape, generator=generator, device=x.device)
        pred = predict(model, corrupt(x, amount, noise), 0)
        return F.mse_loss(pred.float(), x)

    def sample(self, net: nn.Module, indices: range) -> torch.Tensor:
        cfg = self.run.cfg
        shape = (cfg.channels, cfg.resolution, cfg.resolution)
        return sample_basic(net, cfg.sample_steps, shape, indices, cfg.seed, self.device)

    @torch.no_grad()
    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """Three rows: clean images, corrupted with amounts 0..1, the network's predictions."""
        x = to_float(self.run.data.images[:8].to(self.device), VALUE_RANGE, None)
        amount = torch.linspace(0, 1, x.shape[0], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.run.cfg.seed)
        noisy = corrupt(x, amount, generator=generator)
        pred = predict(net, noisy, 0).float().clamp(0, 1)
        rows = torch.cat([x, noisy, pred])
        return {"corruption_panel": make_grid(to_uint8(rows, VALUE_RANGE), nrow=x.shape[0])}

    def data_pictures(self) -> dict[str, np.ndarray]:
        return {}

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        return images, 8

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        net.save_pretrained(folder, safe_serialization=True)

    def card(self) -> CardFacts:
        cfg = self.run.cfg
        network = "BasicUNet (this toolkit's)" if cfg.model == "basic" else "UNet2DModel"
        return CardFacts(
            title=f"Basic denoiser on {cfg.dataset}",
            summary=(
                f"A {network} that predicts the clean image from a {cfg.resolution}x"
                f"{cfg.resolution} image blended with uniform noise by an amount in [0, 1]; it "
                "generates images from pure noise by stepping toward its prediction."
            ),
            script="basic",
            sampler=(
                f"{cfg.sample_steps} steps toward the prediction made the grid above "
                "(`python sample.py <folder> --num-steps N`; 5 to 50 work)."
            ),
            how_to_load=(
                "from pathlib import Path\n"
                "from diffusion.loading import load_for_sampling  # this toolkit\n"
                'loaded = load_for_sampling(Path("path/to/this/folder"))  # .model, .resolution'
            ),
            facts=[("objective", "MSE to the clean image"), ("network", network)],
            tags=["denoiser"],
        )


def train(cfg: BasicConfig) -> Run:
    run = start_run(cfg)
    model = build_basic_model(cfg.model, cfg.resolution, cfg.channels)
    loop.train(run, BasicMethod(run), model, evaluator=training_evaluator(run))
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(BasicConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
