"""Train the seed's corruption denoiser (section 1): predict the clean image from a blend.

x_noisy = (1 - amount) * x + amount * U[0,1) noise, amount ~ U[0,1) per image; the network
predicts x (MSE). Sampling starts from uniform noise and moves 1/(n-i) of the way toward the
prediction at step i.

    # one process (CPU or one GPU), built-in digits, ~5 minutes on a 2-core CPU:
    python train_basic.py
    # the seed's UNet2DModel variant:
    python train_basic.py --model unet --output-dir runs/basic-unet
    # two processes on one machine (CPU, gloo); see the README for GPUs and nodes:
    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_2proc.yaml \
        train_basic.py --max-steps 200
    # sample from the export:
    python sample.py runs/basic/model --num-samples 64 --output-dir runs/basic/samples

Rerunning the same command resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ddp_utils.config import TrainConfig, _check, option, parse_config
from ddp_utils.data import to_float
from ddp_utils.distributed import generate_sharded, mean_across_ranks, step_generator
from ddp_utils.optim import lr_at, make_optimizer, set_lr
from ddp_utils.progress import Progress
from ddp_utils.run import Run, cli_main, logger, start_run
from diffusion.corruption import corrupt, sample_basic
from diffusion.images import make_grid, to_uint8
from diffusion.models import build_basic_model, count_parameters, predict, speed_up


@dataclass
class BasicConfig(TrainConfig):
    """The corruption denoiser; defaults train readable digits in ~5 minutes on 2 CPU cores."""

    model: str = option("basic", "the seed's BasicUNet or its UNet2DModel", ("basic", "unet"))
    optimizer: str = option("adam", "the seed uses Adam", ("adam", "adamw"))
    output_dir: str = option("runs/basic", "run directory: checkpoints, export, samples, logs")
    batch_size: int = option(128, "per-device batch size (the seed uses 128)")
    max_steps: int = option(1500, "number of optimizer steps")
    sample_steps: int = option(40, "sampler steps for the logged grids (the seed uses 5 to 50)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.sample_steps >= 1, f"--sample-steps must be >= 1, got {self.sample_steps}")
        _check(
            self.resolution % 4 == 0,
            f"--resolution must be divisible by 4 for these UNets (2 downsamplings), "
            f"got {self.resolution}",
        )


VALUE_RANGE = (0.0, 1.0)  # the seed trains on ToTensor() images, in [0, 1]
TASK_INFO = {"task": "basic", "value_range": list(VALUE_RANGE)}  # tells sample.py what this is


def sample_grid(run: Run, model: torch.nn.Module, num_images: int, num_steps: int) -> np.ndarray:
    """A grid from fixed seeds (comparable over the run), sharded over all ranks."""
    cfg, acc = run.cfg, run.accelerator
    net = acc.unwrap_model(model)
    net.eval()
    images = generate_sharded(
        acc,
        num_images,
        64,
        lambda idx: sample_basic(
            net,
            num_steps,
            (cfg.channels, cfg.resolution, cfg.resolution),
            idx,
            cfg.seed,
            acc.device,
        ),
    )
    net.train()
    return make_grid(to_uint8(images, VALUE_RANGE), nrow=8)


@torch.no_grad()
def corruption_panel(run: Run, model: torch.nn.Module) -> np.ndarray:
    """The seed's three rows: clean images, corrupted with amount 0..1, the predictions."""
    acc = run.accelerator
    x = to_float(run.data.images[:8].to(acc.device), VALUE_RANGE, None)
    amount = torch.linspace(0, 1, x.shape[0], device=acc.device)
    generator = torch.Generator(device=acc.device).manual_seed(run.cfg.seed)
    noisy = corrupt(x, amount, generator=generator)
    net = acc.unwrap_model(model)
    net.eval()
    pred = predict(net, noisy, 0).float()
    net.train()
    rows = torch.cat([x, noisy, pred.clamp(0, 1)])
    return make_grid(to_uint8(rows, VALUE_RANGE), nrow=x.shape[0])


def train(cfg: BasicConfig) -> Run:
    run = start_run(cfg)
    acc = run.accelerator

    # Build model and optimizer.
    model = build_basic_model(cfg.model, cfg.resolution, cfg.channels)
    speed_up(model, cfg.channels_last, cfg.compile, cfg.compile_backend)
    model_config = dict(model.config)
    optimizer = make_optimizer(
        cfg.optimizer,
        model.parameters(),
        cfg.learning_rate,
        (0.9, 0.999),
        cfg.weight_decay,
        acc.device,
    )
    model, optimizer = acc.prepare(model, optimizer)
    run.describe(count_parameters(model))

    # Resume.
    step = run.restore(model, optimizer, model_config, extra=TASK_INFO)
    batches = run.batches(start_micro_step=step * cfg.gradient_accumulation_steps)
    progress = Progress(acc, start=step, total=cfg.max_steps)
    loss_sum = torch.zeros((), device=acc.device)
    num_losses, window_start = 0, time.perf_counter()

    while step < cfg.max_steps:
        # Accumulate gradients over micro-batches; noise is seeded from (seed, micro-step, rank).
        micro_losses = []
        for micro in range(cfg.gradient_accumulation_steps):
            micro_step = step * cfg.gradient_accumulation_steps + micro
            generator = step_generator(cfg.seed, micro_step, acc.process_index, acc.device)
            x = to_float(
                batches.get(micro_step), VALUE_RANGE, generator if cfg.random_flip else None
            )
            amount = torch.rand(x.shape[0], generator=generator, device=acc.device)
            noise = torch.rand(x.shape, generator=generator, device=acc.device)
            with acc.accumulate(model), acc.autocast():
                pred = predict(model, corrupt(x, amount, noise), 0)
                loss = F.mse_loss(pred.float(), x)
                acc.backward(loss)
            micro_losses.append(loss.detach())
        assert acc.sync_gradients, "accumulation must end on a synchronising micro-step"

        # Update weights (LR from the optimizer step alone: same for any number of processes).
        set_lr(
            optimizer,
            lr_at(step, cfg.learning_rate, cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_schedule),
        )
        grad_norm = (
            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if cfg.max_grad_norm is not None
            else torch.zeros(())
        )
        # All ranks agree: skip a non-finite update? stop after this step? (one host sync)
        step_losses = torch.stack(micro_losses)
        verdict = run.check_step(step, step_losses, grad_norm, optimizer)
        if not verdict.skip:
            optimizer.step()
            loss_sum += step_losses.sum()
            num_losses += len(micro_losses)
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # Log (averaged across ranks every --log-every steps).
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            stats = mean_across_ranks(
                acc, torch.stack([loss_sum / num_losses, grad_norm.float().to(acc.device)])
            ).tolist()
            elapsed = time.perf_counter() - window_start
            images_per_s = num_losses * cfg.batch_size * acc.num_processes / elapsed
            values = {
                "loss": stats[0],
                "grad_norm": stats[1],
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": images_per_s,
                "nonfinite_steps": run.guard.num_nonfinite_steps,
            }
            run.tracker.log(values, step)
            progress.update(step, loss=stats[0], images_per_s=images_per_s)
            loss_sum.zero_()
            num_losses, window_start = 0, time.perf_counter()

        # Sample.
        if (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.max_steps:
            grid = sample_grid(run, model, cfg.num_sample_images, cfg.sample_steps)
            run.tracker.log_image("samples", grid, step)
            run.tracker.log_image("corruption_panel", corruption_panel(run, model), step)

        # Checkpoint; after a stop verdict (SIGTERM, SIGUSR1, time budget) save here and exit.
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or verdict.stop:
            run.save(step, model, optimizer, model_config, extra=TASK_INFO)
        if verdict.stop and step < cfg.max_steps:
            progress.close()
            run.stop(step, verdict.stop_reason)  # raises TrainingStopped: exit code 75

    # Export: a save_pretrained folder that sample.py and load_model rebuild alone.
    progress.close()
    export = run.export(model, run.output_dir / "model", TASK_INFO)
    logger.info("exported %s; samples and panels in %s", export, run.tracker.images_dir)
    run.finish()
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(BasicConfig, argv, description=__doc__))


if __name__ == "__main__":
    cli_main(main)
