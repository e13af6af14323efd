"""Train a DDPM (the seed's section 2): noise prediction over 1000 timesteps, EMA, DDIM grids.

    # built-in digits on a CPU (the README's main job, ~10 minutes on 2 cores):
    python train_ddpm.py
    # the seed's CIFAR-10 recipe on N GPUs in bf16 (edit the config for your machine):
    accelerate launch --config_file accelerate_configs/1node_8gpu_bf16.yaml train_ddpm.py \
        --dataset cifar10 --preset seed-large --random-flip --mixed-precision bf16 \
        --batch-size 32 --max-steps 200000 --output-dir runs/cifar10-seed-large
    # sample from the exported pipeline (diffusers' DDPMPipeline/DDIMPipeline load it too):
    python sample.py runs/ddpm/pipeline --scheduler ddim --num-inference-steps 50

Rerunning the same command resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddp_utils.config import TrainConfig, _check, option, parse_config
from ddp_utils.data import to_float
from ddp_utils.distributed import generate_sharded, mean_across_ranks, step_generator
from ddp_utils.model_io import write_task_file
from ddp_utils.optim import lr_at, make_optimizer, set_lr
from ddp_utils.progress import Progress
from ddp_utils.run import Run, cli_main, logger, start_run
from diffusion.ddpm import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    diffusion_loss,
    make_train_scheduler,
)
from diffusion.ema import EMA
from diffusion.images import make_grid, to_uint8
from diffusion.models import build_ddpm_unet, count_parameters, speed_up
from diffusion.sampling import make_inference_scheduler, sample_ddpm
from evaluation import (
    FeatureStats,
    compute_feature_stats,
    dataset_reference_stats,
    fid_kid,
    load_fid_inception,
    local_chunks,
)

VALUE_RANGE = (-1.0, 1.0)  # the seed normalises with Normalize([0.5], [0.5])
NUM_QUARTILES = 4
BEST_DIR, BEST_FILE = "best", "fid.json"  # the lowest-FID pipeline, never pruned


@dataclass
class DDPMConfig(TrainConfig):
    """DDPM training; defaults make readable digits in ~10 minutes on a 2-core CPU."""

    preset: str = option(
        "digits-small",
        "UNet preset (digits-small, seed-small, seed-large, ddpm-cifar10) or a JSON config file",
    )
    prediction_type: str = option("epsilon", "network target", PREDICTION_TYPES)
    beta_schedule: str = option("squaredcos_cap_v2", "noise schedule (the seed's)", BETA_SCHEDULES)
    num_train_timesteps: int = option(1000, "diffusion timesteps T")
    min_snr_gamma: float | None = option(None, "min-SNR-gamma loss weighting (e.g. 5); none: off")
    optimizer: str = option("adamw", "the seed uses AdamW", ("adam", "adamw"))
    learning_rate: float = option(4e-4, "peak learning rate (the seed's 4e-4)")
    lr_warmup_steps: int = option(200, "linear warmup, in optimizer steps")
    batch_size: int = option(64, "per-device batch size")
    max_steps: int = option(4000, "number of optimizer steps")
    output_dir: str = option("runs/ddpm", "run directory: checkpoints, export, samples, logs")
    use_ema: bool = option(True, "keep an EMA of the weights (used for samples and the export)")
    ema_max_decay: float = option(0.9999, "EMA decay after warmup: min(this, (1+s)/(10+s))")
    sample_steps: int = option(50, "DDIM steps for the logged grids")
    sample_every: int = option(1000, "log a sample grid every N steps (0: only at the end)")
    eval_every: int = option(
        0, "FID/KID of EMA samples vs the training data every N steps (0: off; eval extra)"
    )
    eval_num_samples: int = option(1000, "EMA samples per evaluation (DDIM, fixed seeds)")
    eval_num_reference: int | None = option(
        None, "reference: the first N training images (none: all; statistics are cached)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_train_timesteps >= 2, "--num-train-timesteps must be >= 2")
        _check(
            self.min_snr_gamma is None or self.min_snr_gamma > 0,
            f"--min-snr-gamma must be > 0 or none, got {self.min_snr_gamma}",
        )
        _check(0 < self.ema_max_decay < 1, "--ema-max-decay must be in (0, 1)")
        _check(self.sample_steps >= 1, "--sample-steps must be >= 1")
        _check(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        _check(self.eval_num_samples >= 2, "--eval-num-samples must be >= 2 (a covariance)")
        _check(
            self.eval_num_reference is None or self.eval_num_reference >= 2,
            f"--eval-num-reference must be >= 2 or none, got {self.eval_num_reference}",
        )


def task_info(scheduler) -> dict:
    """What sample.py needs to know about this model beyond its weights."""
    return {
        "task": "ddpm",
        "value_range": list(VALUE_RANGE),
        "scheduler_config": dict(scheduler.config),
    }


@torch.no_grad()
def forward_noising_strip(run: Run, scheduler) -> np.ndarray:
    """A real batch noised at timesteps spread over 0..T-1 (the seed's 2.1.3 picture)."""
    acc, images = run.accelerator, run.data.images[:8]
    x0 = to_float(images.to(acc.device), VALUE_RANGE, None)
    rows = []
    generator = torch.Generator(device=acc.device).manual_seed(run.cfg.seed)
    for t in torch.linspace(0, scheduler.config.num_train_timesteps - 1, 8).long():
        noise = torch.randn(x0.shape, generator=generator, device=acc.device)
        rows.append(scheduler.add_noise(x0, noise, t.repeat(len(x0)).to(acc.device)))
    return make_grid(to_uint8(torch.cat(rows), VALUE_RANGE), nrow=len(x0))


def sample_pictures(run: Run, model, ema: EMA | None, scheduler) -> tuple[np.ndarray, np.ndarray]:
    """Grid from fixed seeds with DDIM (EMA weights), and a denoising strip of 8 samples."""
    cfg, acc = run.cfg, run.accelerator
    net = acc.unwrap_model(model)
    ddim = make_inference_scheduler("ddim", scheduler.config)
    strip: list[torch.Tensor] = []

    def chunk(indices: list[int]) -> torch.Tensor:
        every = max(1, cfg.sample_steps // 10) if not strip else None
        x, snapshots = sample_ddpm(
            net, ddim, indices, cfg.seed, cfg.sample_steps, 0.0, acc.device, progression_every=every
        )
        if snapshots and not strip:
            strip.extend(s[:8] for s in snapshots)
        return x

    net.eval()
    with ema.swapped_into(net) if ema is not None else contextlib.nullcontext():
        images = generate_sharded(acc, cfg.num_sample_images, 64, chunk)
    net.train()
    grid = make_grid(to_uint8(images, VALUE_RANGE), nrow=8)
    rows = strip if strip else [images[:8]]
    return grid, make_grid(to_uint8(torch.cat(rows), VALUE_RANGE), nrow=min(8, len(rows[0])))


def export_pipeline(
    run: Run,
    model,
    ema: EMA | None,
    scheduler,
    folder: Path | None = None,
    json_files: dict[str, dict] | None = None,
) -> Path:
    """A diffusers pipeline folder (EMA unet) + the raw weights as `unet_raw/` (collective).

    Default folder `<output-dir>/pipeline`. Written beside it and swapped in by renames, so a
    reader (or a crash) never meets half a folder; `json_files` are written into it too.
    """
    from diffusers import DDPMPipeline

    folder = folder or run.output_dir / "pipeline"
    if run.is_writer:
        tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        raw = run.accelerator.unwrap_model(model)
        unet = copy.deepcopy(raw)
        if ema is not None:
            ema.copy_to(unet)
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        raw.save_pretrained(tmp / "unet_raw", safe_serialization=True)
        write_task_file(tmp, resolution=run.cfg.resolution, **task_info(scheduler))
        for name, content in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return folder


def setup_eval(run: Run) -> tuple[torch.nn.Module, FeatureStats]:
    """The FID network, and the statistics of the training images (the first
    --eval-num-reference), cached on disk (collective)."""
    cfg, data = run.cfg, run.data
    try:
        extractor = load_fid_inception(run.accelerator.device)
    except ImportError as err:
        raise ValueError(f"--eval-every: {err}") from None
    reference = dataset_reference_stats(
        data.images[: cfg.eval_num_reference],
        cfg.dataset,
        data.fingerprint,
        extractor=extractor,
        accelerator=run.accelerator,
        batch_size=cfg.batch_size,
    )
    return extractor, reference


def evaluate_fid(
    run: Run, model, ema: EMA | None, scheduler, extractor, reference: FeatureStats
) -> dict[str, float]:
    """FID/KID of --eval-num-samples EMA samples, DDIM in --sample-steps, same seeds every time.

    Collective: rank r samples and featurizes chunks r, r + world, ... of --batch-size images
    (evaluation's sharding rule), so the numbers do not depend on the number of processes.
    """
    cfg, acc = run.cfg, run.accelerator
    net = acc.unwrap_model(model)
    ddim = make_inference_scheduler("ddim", scheduler.config)

    def local_samples():
        for chunk in local_chunks(cfg.eval_num_samples, cfg.batch_size, acc):
            indices = range(chunk.start, chunk.stop)
            x, _ = sample_ddpm(net, ddim, indices, cfg.seed, cfg.sample_steps, 0.0, acc.device)
            yield torch.from_numpy(to_uint8(x, VALUE_RANGE)).permute(0, 3, 1, 2)

    net.eval()
    with ema.swapped_into(net) if ema is not None else contextlib.nullcontext():
        stats = compute_feature_stats(local_samples(), extractor, acc)
    net.train()
    metrics = fid_kid(stats, reference, seed=cfg.seed, device=acc.device)
    logger.info(
        "FID %.3f, KID %.5f (%d EMA samples)",
        metrics["fid"],
        metrics["kid_mean"],
        len(stats.features),
    )
    return {name: float(metrics[name]) for name in ("fid", "kid_mean", "kid_std")}


def previous_best_fid(run: Run) -> float:
    """FID of `<output-dir>/best` when resuming (a fresh start replaces it at its first eval)."""
    best_file = run.output_dir / BEST_DIR / BEST_FILE
    if run.checkpoint is None or not best_file.is_file():
        return math.inf
    return float(json.loads(best_file.read_text())["fid"])


def train(cfg: DDPMConfig) -> Run:
    run = start_run(cfg)
    acc = run.accelerator

    # Evaluation: FID network and training-data statistics first (a missing extra fails now).
    extractor, reference = setup_eval(run) if cfg.eval_every else (None, None)
    best_fid = previous_best_fid(run)

    # Build model, noise schedule, optimizer and EMA.
    model = build_ddpm_unet(cfg.preset, cfg.resolution, cfg.channels)
    speed_up(model, cfg.channels_last, cfg.compile, cfg.compile_backend)
    model_config = dict(model.config)
    scheduler = make_train_scheduler(
        cfg.beta_schedule, cfg.num_train_timesteps, cfg.prediction_type
    )
    optimizer = make_optimizer(
        cfg.optimizer,
        model.parameters(),
        cfg.learning_rate,
        (0.9, 0.999),
        cfg.weight_decay,
        acc.device,
    )
    model, optimizer = acc.prepare(model, optimizer)
    ema = EMA(acc.unwrap_model(model), cfg.ema_max_decay) if cfg.use_ema else None
    run.describe(count_parameters(model))

    # Resume.
    step = run.restore(model, optimizer, model_config, ema, extra=task_info(scheduler))
    if step == 0:
        run.tracker.log_image("forward_noising", forward_noising_strip(run, scheduler), 0)
    batches = run.batches(start_micro_step=step * cfg.gradient_accumulation_steps)
    progress = Progress(acc, start=step, total=cfg.max_steps)
    # Running sums on the device: read once per --log-every (no per-step host sync).
    loss_sum = torch.zeros((), device=acc.device)
    quartile_sum = torch.zeros(NUM_QUARTILES, device=acc.device)
    quartile_count = torch.zeros(NUM_QUARTILES, device=acc.device)
    num_losses, window_start = 0, time.perf_counter()

    while step < cfg.max_steps:
        # Accumulate gradients. Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), regress the target.
        micro_losses = []
        step_quartiles = torch.zeros(2, NUM_QUARTILES, device=acc.device)  # loss sums, counts
        for micro in range(cfg.gradient_accumulation_steps):
            micro_step = step * cfg.gradient_accumulation_steps + micro
            generator = step_generator(cfg.seed, micro_step, acc.process_index, acc.device)
            x0 = to_float(
                batches.get(micro_step), VALUE_RANGE, generator if cfg.random_flip else None
            )
            noise = torch.randn(x0.shape, generator=generator, device=acc.device)
            t = torch.randint(
                0, cfg.num_train_timesteps, (x0.shape[0],), generator=generator, device=acc.device
            )
            with acc.accumulate(model), acc.autocast():
                loss, per_sample = diffusion_loss(model, scheduler, x0, t, noise, cfg.min_snr_gamma)
                acc.backward(loss)
            micro_losses.append(loss.detach())
            bins = t * NUM_QUARTILES // cfg.num_train_timesteps
            step_quartiles[0].index_add_(0, bins, per_sample.float())
            step_quartiles[1].index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float32))
        assert acc.sync_gradients, "accumulation must end on a synchronising micro-step"

        # Update weights (LR from the optimizer step: identical for 1 or N processes) and EMA.
        set_lr(
            optimizer,
            lr_at(step, cfg.learning_rate, cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_schedule),
        )
        grad_norm = (
            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if cfg.max_grad_norm is not None
            else torch.zeros((), device=acc.device)
        )
        # All ranks agree: skip a non-finite update? stop after this step? (one host sync)
        step_losses = torch.stack(micro_losses)
        verdict = run.check_step(step, step_losses, grad_norm, optimizer)
        if not verdict.skip:
            optimizer.step()
            loss_sum += step_losses.sum()
            quartile_sum += step_quartiles[0]
            quartile_count += step_quartiles[1]
            num_losses += len(micro_losses)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None and not verdict.skip:
            ema.update(acc.unwrap_model(model), step)

        # Log.
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            stats = mean_across_ranks(
                acc,
                torch.cat(
                    [
                        (loss_sum / num_losses)[None],
                        grad_norm.float().to(acc.device)[None],
                        quartile_sum,
                        quartile_count,
                    ]
                ),
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
            sums, counts = stats[2 : 2 + NUM_QUARTILES], stats[2 + NUM_QUARTILES :]
            for q in range(NUM_QUARTILES):
                if counts[q] > 0:
                    values[f"loss_t_q{q}"] = sums[q] / counts[q]
            run.tracker.log(values, step)
            progress.update(step, loss=stats[0], images_per_s=images_per_s)
            loss_sum.zero_()
            quartile_sum.zero_()
            quartile_count.zero_()
            num_losses, window_start = 0, time.perf_counter()

        # Sample (every rank takes part: the grid is sharded).
        if (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.max_steps:
            grid, strip = sample_pictures(run, model, ema, scheduler)
            run.tracker.log_image("samples", grid, step)
            run.tracker.log_image("denoising", strip, step)

        # Evaluate (sharded; not when stopping: the save comes first). Lowest FID -> best/.
        eval_now = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps)
        if eval_now and not verdict.stop:
            metrics = evaluate_fid(run, model, ema, scheduler, extractor, reference)
            run.tracker.log(metrics, step)
            if metrics["fid"] < best_fid:
                best_fid = metrics["fid"]
                record = {"step": step, **metrics, "num_samples": cfg.eval_num_samples}
                export_pipeline(
                    run, model, ema, scheduler, run.output_dir / BEST_DIR, {BEST_FILE: record}
                )

        # Checkpoint; after a stop verdict (SIGTERM, SIGUSR1, time budget) save here and exit.
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or verdict.stop:
            run.save(step, model, optimizer, model_config, ema, extra=task_info(scheduler))
        if verdict.stop and step < cfg.max_steps:
            progress.close()
            run.stop(step, verdict.stop_reason)  # raises TrainingStopped: exit code 75

    # Export a diffusers pipeline (EMA weights) that DDPMPipeline/DDIMPipeline load as is.
    progress.close()
    folder = export_pipeline(run, model, ema, scheduler)
    logger.info("exported %s; samples in %s", folder, run.tracker.images_dir)
    run.finish()
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(DDPMConfig, argv, description=__doc__))


if __name__ == "__main__":
    cli_main(main)
