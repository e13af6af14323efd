"""The options every training script shares: one `TrainConfig` that the scripts extend.

Each field is a flag of both `train_basic.py` and `train_ddpm.py` (same name, same meaning);
a script's own config subclasses this one and may change a default (`--max-steps`,
`--batch-size`, ...). Validation names the flag and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ddp_utils.config import check_choices, option, require
from ddp_utils.data.load import DataLoading
from ddp_utils.errors import flag_name
from ddp_utils.tracking import ReportTo

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)([hms])")


def parse_duration(text: str) -> float:
    """Seconds from `5400`, `90s`, `45m`, `2h30m`, `1.5h` or SLURM's `[H:]MM:SS` / `H:MM:SS`."""
    value = text.strip().lower()
    seconds: float | None = None
    try:
        seconds = float(value)
    except ValueError:
        if ":" in value and all(p.isdigit() for p in value.split(":")) and value.count(":") <= 2:
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + int(part)
        elif value and _DURATION_PART.sub("", value) == "":
            units = {"h": 3600.0, "m": 60.0, "s": 1.0}
            seconds = sum(float(n) * units[u] for n, u in _DURATION_PART.findall(value))
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        raise ValueError(
            f"must be a positive duration: seconds (5400), 2h30m, 45m, 90s or H:MM:SS; got {text!r}"
        )
    return seconds


MixedPrecision = Literal["no", "fp16", "bf16"]


@dataclass
class TrainConfig:
    """Fields every training script shares (same flag names everywhere)."""

    # Data.
    dataset: str = option(
        "digits",
        "digits (built in), a folder of images, a save_to_disk folder, or a hub id "
        "(aliases: mnist, fashion_mnist, cifar10)",
    )
    dataset_config: str | None = option(None, "hub dataset config name")
    split: str = option("train", "dataset split")
    image_column: str | None = option(None, "image column; auto-detected when unambiguous")
    label_column: str | None = option(
        None, "class-label column (--class-conditional); auto-detected: the one ClassLabel"
    )
    max_images: int | None = option(None, "use only the first N images of the dataset")
    resolution: int | None = option(
        None,
        "training resolution (square; smaller images are upscaled); default: the images' most "
        "common size (shorter side; the built-in digits: 16), printed in the log",
    )
    channels: int | None = option(
        None, "1 (grayscale) or 3 (RGB); default: what most images are, printed in the log"
    )
    center_crop: bool = option(True, "resize the shorter side then center-crop (else squash)")
    random_flip: bool = option(False, "random horizontal flip (on the device)")
    data_loading: DataLoading = option(
        "auto",
        "memory: decode once into a uint8 tensor on the device; stream: decode per batch in "
        "DataLoader workers; auto: memory when the decoded set is at most 4 GiB",
    )
    num_workers: int | None = option(
        None, "DataLoader workers per process for --data-loading stream (default: cores/procs)"
    )
    # Speed (bench/train_step.py measures them).
    channels_last: bool = option(False, "channels-last memory format for the network (GPUs)")
    compile: bool = option(False, "torch.compile the network (first steps compile: minutes)")
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = option(
        "inductor", "torch.compile backend (aot_eager: no codegen)"
    )
    gradient_checkpointing: bool = option(
        False, "recompute the UNet's activations in the backward pass: less memory, more compute"
    )
    # Optimization.
    output_dir: str = option("runs/train", "run directory: checkpoints, export, samples, logs")
    max_steps: int = option(2000, "number of optimizer steps")
    batch_size: int = option(64, "per-device batch size (global = this x processes x accumulation)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    optimizer: Literal["adam", "adamw"] = option("adamw", "optimizer")
    learning_rate: float = option(1e-3, "peak learning rate")
    lr_schedule: Literal["constant", "cosine"] = option("constant", "after warmup")
    lr_warmup_steps: int = option(0, "linear warmup, in optimizer steps")
    weight_decay: float = option(0.0, "AdamW/Adam weight decay")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    mixed_precision: MixedPrecision | None = option(
        None, "autocast dtype (default: the accelerate config's, else no)"
    )
    seed: int = option(0, "seed for data order, noise and initial weights")
    use_ema: bool = option(True, "keep an EMA of the weights (used for samples and the export)")
    ema_max_decay: float = option(0.9999, "EMA decay after warmup: min(this, (1+s)/(10+s))")
    # Checkpoints, logging, pictures, evaluation.
    save_on_each_node: bool = option(
        False,
        "the run directory is node-local (not shared): the main process of every node writes "
        "checkpoints, exports and logs there, so every node can resume (wandb: global main only)",
    )
    resume: str = option(
        "latest", "latest | none | PATH to a checkpoint-N folder (or to a checkpoints/ folder)"
    )
    checkpoint_every: int = option(500, "save a checkpoint every N optimizer steps")
    checkpoints_total_limit: int | None = option(3, "keep at most N checkpoints (none: all)")
    log_every: int = option(25, "log averaged losses every N steps (one host sync per log)")
    sample_every: int = option(500, "log a sample grid every N steps (0: only at the end)")
    num_sample_images: int = option(64, "images in each logged sample grid")
    sample_steps: int = option(50, "sampler steps for the logged grids and evaluation")
    eval_every: int = option(
        0, "FID/KID of samples vs the training data every N steps (0: off; eval extra)"
    )
    eval_num_samples: int = option(1000, "samples per evaluation (fixed seeds)")
    eval_num_reference: int | None = option(
        None, "reference: the first N training images (none: all; statistics are cached)"
    )
    report_to: ReportTo = option(
        "wandb", "experiment tracker(s): wandb, tensorboard (<output-dir>/tensorboard), all, none"
    )
    log_model: bool = option(
        False,
        "upload the final and best exports to wandb as model artifacts (offline: synced later)",
    )
    push_to_hub: bool = option(
        False,
        "at the end, upload the export (model card, pictures, weights) and best/ to the Hugging "
        "Face Hub (needs a token: `hf auth login` or HF_TOKEN; checked at the start)",
    )
    hub_model_id: str | None = option(
        None, "hub repository for --push-to-hub: name or user/name (default: the run dir's name)"
    )
    hub_private: bool = option(False, "with --push-to-hub: create the repository private")
    wandb_project: str = option("ddp-diffusion", "wandb project name")
    run_name: str | None = option(None, "wandb run name")
    # Fault tolerance (ddp_utils/guard.py).
    max_train_time: str | None = option(
        None,
        "wall time for this invocation (e.g. 5400, 2h30m, 1:30:00); when it is used up the run "
        "saves a checkpoint and exits 75, like on SIGTERM/SIGUSR1; rerun to continue",
    )
    max_nonfinite_steps: int = option(
        10, "stop with an error after N optimizer steps in a row with a non-finite loss"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        self.check_image_size()
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            value = getattr(self, name)
            require(value >= 1, f"{flag_name(name)} must be >= 1, got {value}")
        for name in ("checkpoint_every", "num_sample_images", "sample_steps"):
            value = getattr(self, name)
            require(value >= 1, f"{flag_name(name)} must be >= 1, got {value}")
        for name in ("lr_warmup_steps", "sample_every", "eval_every"):
            value = getattr(self, name)
            require(value >= 0, f"{flag_name(name)} must be >= 0, got {value}")
        require(
            0 < self.learning_rate < 1,
            f"--learning-rate must be in (0, 1), got {self.learning_rate}",
        )
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"--max-grad-norm must be > 0 or none, got {self.max_grad_norm}",
        )
        require(0 < self.ema_max_decay < 1, "--ema-max-decay must be in (0, 1)")
        for name in ("max_images", "num_workers", "checkpoints_total_limit"):
            value = getattr(self, name)
            low = 0 if name == "num_workers" else 1
            require(
                value is None or value >= low,
                f"{flag_name(name)} must be >= {low} or none, got {value}",
            )
        require(
            self.eval_num_samples >= 2,
            f"--eval-num-samples must be >= 2 (a covariance), got {self.eval_num_samples}",
        )
        require(
            self.eval_num_reference is None or self.eval_num_reference >= 2,
            f"--eval-num-reference must be >= 2 or none, got {self.eval_num_reference}",
        )
        if self.max_train_time is not None:
            try:
                parse_duration(self.max_train_time)
            except ValueError as err:
                raise ValueError(f"--max-train-time {err}") from None
        for name in ("hub_model_id", "hub_private"):
            require(
                self.push_to_hub or not getattr(self, name),
                f"{flag_name(name)} applies with --push-to-hub only; add it, or drop "
                f"{flag_name(name)}",
            )
        require(
            self.max_nonfinite_steps >= 1,
            f"--max-nonfinite-steps must be >= 1, got {self.max_nonfinite_steps}",
        )
        require(
            self.resume in ("latest", "none") or Path(self.resume).is_dir(),
            f"--resume must be latest, none or an existing checkpoint folder, got {self.resume!r}",
        )

    def check_image_size(self) -> None:
        """--resolution and --channels, as given or once taken from the data (`start_run`)."""
        require(
            self.resolution is None or self.resolution >= 4,
            f"--resolution must be >= 4, got {self.resolution}",
        )
        require(self.channels in (None, 1, 3), f"--channels must be 1 or 3, got {self.channels}")
