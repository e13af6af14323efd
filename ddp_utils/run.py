"""What every training script does around its loop: set up, resume, save, finish.

`start_run` builds the Accelerator, finds the checkpoint to resume from, opens the tracker
and loads the data; `Run.save` and `Run.restore` move model, EMA and optimizer state in and
out of pickle-free checkpoints. The scripts keep the loop itself.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, str_to_bool

from ddp_utils.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_differences,
    find_resume_checkpoint,
    optimizer_from_safetensors,
    optimizer_to_safetensors,
    write_checkpoint,
)
from ddp_utils.config import TrainConfig, save_config, to_dict
from ddp_utils.data import ImageData, load_image_data
from ddp_utils.distributed import make_accelerator, world_info
from ddp_utils.tracking import Tracker

logger = logging.getLogger("ddp_diffusion")


def setup_logging(accelerator: Accelerator) -> None:
    """INFO on the main process, warnings only elsewhere (one copy of every message)."""
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("datasets", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    output_dir: Path
    tracker: Tracker
    data: ImageData
    checkpoint: Checkpoint | None  # the one resumed from, if any
    started_at: float

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def global_batch_size(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * self.accelerator.num_processes * cfg.gradient_accumulation_steps

    @property
    def start_step(self) -> int:
        return 0 if self.checkpoint is None else self.checkpoint.step

    # ------------------------------------------------------------------ checkpoints

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any],
        ema=None,
    ) -> int:
        """Load the resumed checkpoint into the (prepared) model/optimizer; return its step."""
        ckpt = self.checkpoint
        if ckpt is None:
            return 0
        differences = config_differences(ckpt.state.get("model_config", {}), model_config)
        if differences:
            raise CheckpointError(
                f"{ckpt.path} was made for a different model:\n  "
                + "\n  ".join(differences)
                + "\nuse another --output-dir, or --resume none to start over"
            )
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.load_state_dict(ckpt.tensors["model"])
        optimizer.load_state_dict(
            optimizer_from_safetensors(ckpt.tensors["optimizer"], ckpt.state["optimizer"])
        )
        if ema is not None:
            if "ema" not in ckpt.tensors:
                raise CheckpointError(f"{ckpt.path} has no ema.safetensors but EMA is enabled")
            ema.load_state_dict(ckpt.tensors["ema"])
        scaler = self.accelerator.scaler
        if scaler is not None and ckpt.state.get("grad_scaler"):
            scaler.load_state_dict(ckpt.state["grad_scaler"])
        logger.info("resumed from %s (step %d)", ckpt.path, ckpt.step)
        return ckpt.step

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any],
        ema=None,
        extra: dict[str, Any] | None = None,
    ) -> Path | None:
        """Write checkpoint-<step> (collective: call on every rank; only rank 0 writes)."""
        accelerator = self.accelerator
        path = None
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            opt_tensors, opt_meta = optimizer_to_safetensors(optimizer.state_dict())
            tensors = {"model": unwrapped.state_dict(), "optimizer": opt_tensors}
            if ema is not None:
                tensors["ema"] = ema.state_dict()
            scaler = accelerator.scaler
            state = {
                "config": to_dict(self.cfg),
                "model_class": type(unwrapped).__name__,
                "model_config": model_config,
                "optimizer": opt_meta,
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "num_processes": accelerator.num_processes,
                **(extra or {}),
            }
            path = write_checkpoint(
                self.checkpoints_dir, step, tensors, state, self.cfg.checkpoints_total_limit
            )
            logger.info("saved %s", path)
        accelerator.wait_for_everyone()
        return path

    def export(self, model: torch.nn.Module, folder: Path, task_info: dict[str, Any]) -> Path:
        """`save_pretrained` + task.json into a temp folder, then rename (collective)."""
        if self.accelerator.is_main_process:
            import shutil

            from ddp_utils.model_io import write_task_file

            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
            write_task_file(tmp, resolution=self.cfg.resolution, **task_info)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        self.accelerator.wait_for_everyone()
        return folder

    # ------------------------------------------------------------------ reporting

    def describe(self, num_parameters: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        info = world_info(acc)
        logger.info(
            "data: %s, %d images at %dx%d, %d channel(s)%s",
            self.data.source,
            self.data.num_images,
            cfg.resolution,
            cfg.resolution,
            cfg.channels,
            f" ({self.data.num_skipped} unreadable skipped)" if self.data.num_skipped else "",
        )
        logger.info(
            "batch: per device %d x %d processes x %d accumulation = global %d",
            cfg.batch_size,
            acc.num_processes,
            cfg.gradient_accumulation_steps,
            self.global_batch_size,
        )
        logger.info(
            "model: %s parameters; device %s, mixed precision %s, %s",
            f"{num_parameters:,}",
            info["device"],
            info["mixed_precision"],
            info["distributed_type"],
        )
        logger.info("run directory: %s", self.output_dir.resolve())


def start_run(cfg: TrainConfig) -> Run:
    """Accelerator, resume point, tracker and data, in the order they depend on each other."""
    accelerator = make_accelerator(
        cfg.mixed_precision,
        cfg.gradient_accumulation_steps,
        cfg.report_to,
        cfg.output_dir,
        cfg.seed,
    )
    setup_logging(accelerator)
    # On CPU, Accelerate quietly turns an FSDP launch into DDP/single process: check the request.
    if accelerator.distributed_type == DistributedType.FSDP or str_to_bool(
        os.environ.get("ACCELERATE_USE_FSDP", "false")
    ):
        raise ValueError(
            "FSDP is not supported: checkpoints gather full state dicts on the main process, "
            "which deadlocks with sharded parameters. Launch with DDP (accelerate_configs/"
            "1node_8gpu_bf16.yaml); every preset here fits one GPU with room to spare."
        )
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    # Every rank reads the checkpoint itself (no broadcast of large tensors needed).
    checkpoint = find_resume_checkpoint(output_dir / "checkpoints", cfg.resume)
    if checkpoint is None and cfg.resume == "latest" and (output_dir / "checkpoints").exists():
        logger.info("no intact checkpoint in %s: starting from scratch", output_dir)
    tracker = Tracker(
        accelerator,
        output_dir,
        cfg.report_to,
        cfg.wandb_project,
        cfg.run_name,
        to_dict(cfg),
        resume_step=None if checkpoint is None else checkpoint.step,
    )
    data = load_image_data(
        cfg.dataset,
        cfg.resolution,
        cfg.channels,
        dataset_config=cfg.dataset_config,
        split=cfg.split,
        image_column=cfg.image_column,
        center_crop=cfg.center_crop,
        max_images=cfg.max_images,
        accelerator=accelerator,
    )
    return Run(cfg, accelerator, output_dir, tracker, data, checkpoint, time.time())


def cli_main(fn: Callable[[], Any]) -> None:
    """Run a script's entry point; a bad input (ValueError, missing file) exits 2 with its message.

    Set DDP_DIFFUSION_DEBUG=1 to see the traceback as well.
    """
    try:
        fn()
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("DDP_DIFFUSION_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
