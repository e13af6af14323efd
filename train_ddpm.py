"""Train a DDPM: noise prediction over 1000 timesteps, EMA, DDIM grids, a diffusers pipeline.

    # built-in digits on a CPU (the README's main job, ~11 minutes on 2 cores):
    python train_ddpm.py
    # CIFAR-10 on N GPUs in bf16 (edit the config for your machine):
    accelerate launch --config_file accelerate_configs/1node_8gpu_bf16.yaml train_ddpm.py \
        --dataset cifar10 --preset unet-18m --random-flip --mixed-precision bf16 \
        --batch-size 32 --max-steps 200000 --output-dir runs/cifar10-unet-18m
    # sample from the exported pipeline (diffusers' DDPMPipeline/DDIMPipeline load it too):
    python sample.py runs/ddpm/pipeline --scheduler ddim --num-inference-steps 50

Rerunning the same command resumes from the latest complete checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from torch import nn

from ddp_utils import loop
from ddp_utils.cli import cli_main
from ddp_utils.config import option, parse_config, require
from ddp_utils.data import Batch, to_float
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.run import Run, start_run
from ddp_utils.train_config import TrainConfig
from diffusion.ddpm import (
    VALUE_RANGE,
    BetaSchedule,
    PredictionType,
    diffusion_loss,
    make_train_scheduler,
)
from diffusion.models import build_ddpm_unet
from diffusion.sampling import make_inference_scheduler, sample_ddpm

NUM_TIMESTEP_BINS = 4  # the loss is also logged per quarter of the timesteps: loss_t_q0..3


@dataclass
class DDPMConfig(TrainConfig):
    """DDPM training; defaults make readable digits in ~11 minutes on a 2-core CPU."""

    preset: str = option(
        "digits-small",
        "UNet preset (digits-small, unet-4.7m, unet-18m, ddpm-cifar10) or a JSON config file",
    )
    prediction_type: PredictionType = option("epsilon", "network target")
    beta_schedule: BetaSchedule = option("squaredcos_cap_v2", "noise schedule")
    num_train_timesteps: int = option(1000, "diffusion timesteps T")
    min_snr_gamma: float | None = option(None, "min-SNR-gamma loss weighting (e.g. 5); none: off")
    learning_rate: float = option(4e-4, "peak learning rate")
    lr_warmup_steps: int = option(200, "linear warmup, in optimizer steps")
    batch_size: int = option(64, "per-device batch size")
    max_steps: int = option(4000, "number of optimizer steps")
    output_dir: str = option("runs/ddpm", "run directory: checkpoints, export, samples, logs")
    sample_steps: int = option(50, "DDIM steps for the logged grids and evaluation")
    sample_every: int = option(1000, "log a sample grid every N steps (0: only at the end)")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.num_train_timesteps >= 2,
            f"--num-train-timesteps must be >= 2, got {self.num_train_timesteps}",
        )
        require(
            self.min_snr_gamma is None or self.min_snr_gamma > 0,
            f"--min-snr-gamma must be > 0 or none, got {self.min_snr_gamma}",
        )


class DDPMMethod:
    """Ho et al. 2020: regress the noise (or x0, or v) added at a random timestep."""

    value_range = VALUE_RANGE
    export_name = "pipeline"

    def __init__(self, run: Run, scheduler: DDPMScheduler) -> None:
        self.run, self.cfg, self.scheduler = run, run.cfg, scheduler
        self.device = run.accelerator.device
        self.sampler = make_inference_scheduler("ddim", scheduler.config)

    def task_info(self) -> dict[str, Any]:
        return {
            "task": "ddpm",
            "value_range": list(VALUE_RANGE),
            "scheduler_config": dict(self.scheduler.config),
        }

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        # Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), regress the target at x_t.
        x0, num_timesteps = batch.images, self.cfg.num_train_timesteps
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        loss, per_sample = diffusion_loss(
            model, self.scheduler, x0, t, noise, self.cfg.min_snr_gamma
        )
        bins = t * NUM_TIMESTEP_BINS // num_timesteps
        sums = torch.zeros(NUM_TIMESTEP_BINS, device=x0.device).index_add_(0, bins, per_sample)
        counts = torch.zeros(NUM_TIMESTEP_BINS, device=x0.device).index_add_(
            0, bins, torch.ones_like(per_sample)
        )
        for q in range(NUM_TIMESTEP_BINS):
            stats.add(f"loss_t_q{q}", sums[q], counts[q])
        return loss

    def sample(self, net: nn.Module, indices: range) -> torch.Tensor:
        cfg = self.cfg
        x, _ = sample_ddpm(net, self.sampler, indices, cfg.seed, cfg.sample_steps, 0.0, self.device)
        return x

    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """The denoising strip: x_t of the grid's first 8 samples, every 1/10 of the steps."""
        cfg = self.cfg
        every = max(1, cfg.sample_steps // 10)
        _, snapshots = sample_ddpm(
            net,
            self.sampler,
            range(min(8, cfg.num_sample_images)),
            cfg.seed,
            cfg.sample_steps,
            0.0,
            self.device,
            progression_every=every,
        )
        rows = torch.cat(snapshots)
        return {"denoising": make_grid(to_uint8(rows, VALUE_RANGE), nrow=len(snapshots[0]))}

    @torch.no_grad()
    def data_pictures(self) -> dict[str, np.ndarray]:
        """A real batch noised at timesteps spread over 0..T-1."""
        x0 = to_float(self.run.data.images[:8].to(self.device), VALUE_RANGE, None)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        rows = []
        for t in torch.linspace(0, self.cfg.num_train_timesteps - 1, 8).long():
            noise = torch.randn(x0.shape, generator=generator, device=self.device)
            rows.append(self.scheduler.add_noise(x0, noise, t.repeat(len(x0)).to(self.device)))
        return {"forward_noising": make_grid(to_uint8(torch.cat(rows), VALUE_RANGE), nrow=len(x0))}

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A diffusers DDPMPipeline folder (EMA weights) and the raw weights in `unet_raw/`."""
        DDPMPipeline(unet=net, scheduler=self.scheduler).save_pretrained(
            folder, safe_serialization=True
        )
        raw.save_pretrained(folder / "unet_raw", safe_serialization=True)


def train(cfg: DDPMConfig) -> Run:
    run = start_run(cfg)
    model = build_ddpm_unet(cfg.preset, cfg.resolution, cfg.channels)
    scheduler = make_train_scheduler(
        cfg.beta_schedule, cfg.num_train_timesteps, cfg.prediction_type
    )
    loop.train(run, DDPMMethod(run, scheduler), model)
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(DDPMConfig, argv, description=__doc__))


if __name__ == "__main__":
    cli_main(main)
