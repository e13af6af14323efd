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
from typing import Literal

from ddp_utils import loop
from ddp_utils.cli import cli_main
from ddp_utils.config import option, parse_config, require
from ddp_utils.run import Run, start_run
from ddp_utils.train_config import TrainConfig
from diffusion.kinds.basic import BASIC
from diffusion.networks.basic import build_basic_model


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


def train(cfg: BasicConfig) -> Run:
    run = start_run(cfg)
    cfg.freeze()
    model = build_basic_model(cfg.model, cfg.resolution, cfg.channels)
    loop.train(run, BASIC.method(run), model)
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(BasicConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
