"""The options every training script shares: one `TrainConfig` that the scripts extend.

Each field is a flag of both `train_basic.py` and `train_ddpm.py` (same name, same meaning);
a script's own config subclasses this one and may change a default (`--max-steps`,
`--batch-size`, ...). Validation names the flag and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from ddp_utils.compile import CompileBackend, CompileMode, check_compile_options
from ddp_utils.config import ForeignFlag, check_fields, option, require
from ddp_utils.data.load import DataLoading, peek_image_size
from ddp_utils.data.source import check_dataset_name
from ddp_utils.errors import InputError, flag_name
from ddp_utils.sharding import Sharding
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

_STEPS_NOT_EPOCHS = (
    "this toolkit counts optimizer steps, not epochs: use {flag} (1 epoch = images / global "
    "batch steps; a run prints both at its start)"
)
_NOT_CONFIGURABLE = "not configurable here (torch's defaults: betas (0.9, 0.999), eps 1e-8)"
# The flags of diffusers' examples/unconditional_image_generation/train_unconditional.py and
# examples/text_to_image/train_text_to_image.py that are not already this toolkit's flags with
# `_` for `-` (--output_dir, --resolution, --learning_rate, --use_ema, --mixed_precision, ...).
DIFFUSERS_FLAGS: dict[str, ForeignFlag] = {
    # Aliases: the same meaning.
    "--dataset_name": ForeignFlag("dataset"),
    "--train_data_dir": ForeignFlag("dataset"),
    "--dataset_config_name": ForeignFlag("dataset_config"),
    "--max_train_samples": ForeignFlag("max_images"),
    "--train_batch_size": ForeignFlag("batch_size"),
    "--max_train_steps": ForeignFlag("max_steps"),
    "--checkpointing_steps": ForeignFlag("checkpoint_every"),
    "--resume_from_checkpoint": ForeignFlag("resume"),
    "--dataloader_num_workers": ForeignFlag("num_workers"),
    "--adam_weight_decay": ForeignFlag("weight_decay"),
    "--logger": ForeignFlag("report_to"),
    "--tracker_project_name": ForeignFlag("wandb_project"),
    "--eval_batch_size": ForeignFlag("num_sample_images"),
    "--ddpm_num_steps": ForeignFlag("num_train_timesteps"),
    "--ddpm_beta_schedule": ForeignFlag("beta_schedule"),
    "--snr_gamma": ForeignFlag("min_snr_gamma"),
    "--push_to_hub": ForeignFlag("push_to_hub"),
    "--hub_model_id": ForeignFlag("hub_model_id"),
    "--hub_private_repo": ForeignFlag("hub_private"),
    # Aliases whose meaning differs a little: a note says how.
    "--lr_scheduler": ForeignFlag(
        "lr_schedule",
        "after --lr-warmup-steps of linear warmup (diffusers' `constant` has none)",
        values={"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine"},
    ),
    "--pretrained_model_name_or_path": ForeignFlag(
        "init_from", "training starts from that model's UNet weights (fine-tuning)"
    ),
    "--model_config_name_or_path": ForeignFlag(
        "preset", "a preset name or a UNet2DModel config JSON file (not a folder or hub id)"
    ),
    "--ddpm_num_inference_steps": ForeignFlag(
        "sample_steps", "steps of the grids' sampler, --sample-scheduler (not always DDPM)"
    ),
    "--local_rank": ForeignFlag(
        None, "Accelerate reads each process's rank from the launcher's environment", ignored=True
    ),
    # Refused: no sound equivalent; the message says what to use.
    "--num_epochs": ForeignFlag(None, _STEPS_NOT_EPOCHS.format(flag="--max-steps")),
    "--num_train_epochs": ForeignFlag(None, _STEPS_NOT_EPOCHS.format(flag="--max-steps")),
    "--save_images_epochs": ForeignFlag(None, _STEPS_NOT_EPOCHS.format(flag="--sample-every")),
    "--validation_epochs": ForeignFlag(None, _STEPS_NOT_EPOCHS.format(flag="--sample-every")),
    "--save_model_epochs": ForeignFlag(None, _STEPS_NOT_EPOCHS.format(flag="--checkpoint-every")),
    "--overwrite_output_dir": ForeignFlag(
        None,
        "a run resumes in its --output-dir; start over with --resume none or a new --output-dir",
    ),
    "--cache_dir": ForeignFlag(None, "set HF_HOME (or HF_DATASETS_CACHE) in the environment"),
    "--logging_dir": ForeignFlag(
        None, "logs go to --output-dir (tensorboard: <output-dir>/tensorboard; --report-to)"
    ),
    "--hub_token": ForeignFlag(None, "log in with `hf auth login` or set HF_TOKEN"),
    "--adam_beta1": ForeignFlag(None, _NOT_CONFIGURABLE),
    "--adam_beta2": ForeignFlag(None, _NOT_CONFIGURABLE),
    "--adam_epsilon": ForeignFlag(None, _NOT_CONFIGURABLE),
    "--ema_inv_gamma": ForeignFlag(
        None, "the EMA decay warms up as min(--ema-max-decay, (1 + step) / (10 + step))"
    ),
    "--ema_power": ForeignFlag(
        None, "the EMA decay warms up as min(--ema-max-decay, (1 + step) / (10 + step))"
    ),
    "--enable_xformers_memory_efficient_attention": ForeignFlag(
        None, "PyTorch's scaled_dot_product_attention is used already"
    ),
    "--allow_tf32": ForeignFlag(None, "TF32 matmuls are on for GPUs already"),
    "--use_8bit_adam": ForeignFlag(None, "--optimizer adam|adamw (32-bit)"),
    "--scale_lr": ForeignFlag(None, "give --learning-rate for the global batch you use"),
    "--noise_offset": ForeignFlag(None, "no noise offset; DDPM's --beta-schedule is configurable"),
    "--input_perturbation": ForeignFlag(None, "no input perturbation"),
    "--preserve_input_precision": ForeignFlag(None, "images are decoded to uint8 once"),
    "--image_interpolation_mode": ForeignFlag(None, "images are resized with bicubic filtering"),
    "--offload_ema": ForeignFlag(None, "the EMA stays on the device (--use-ema)"),
    "--foreach_ema": ForeignFlag(None, "the EMA update is always foreach (--use-ema)"),
    "--dream_training": ForeignFlag(None, "no DREAM training"),
    "--dream_detail_preservation": ForeignFlag(None, "no DREAM training"),
    "--revision": ForeignFlag(None, "--init-from takes a local folder or a hub id (main)"),
    "--variant": ForeignFlag(None, "--init-from loads the model's safetensors weights"),
    "--non_ema_revision": ForeignFlag(None, "--init-from takes the EMA weights of an export"),
}


@dataclass
class TrainConfig:
    """Fields every training script shares (same flag names everywhere)."""

    # diffusers' example flags this toolkit translates or refuses (see ddp_utils.config).
    foreign_flags: ClassVar[Mapping[str, ForeignFlag]] = DIFFUSERS_FLAGS
    # Flags a resumed run may give other values than its checkpoint was trained with: they
    # change how long it trains, what it reports and how fast it runs, not what a step
    # computes. Any other difference is refused (`ddp_utils.run.check_resumed_flags`).
    # Per-device batch and accumulation may change with the number of processes (a warning
    # says when the global batch changes).
    may_change_on_resume: ClassVar[frozenset[str]] = frozenset(
        {
            "max_steps", "max_train_time", "output_dir", "resume",  # how long, where
            "log_every", "sample_every", "num_sample_images", "sample_steps",  # reporting
            "checkpoint_every", "checkpoints_total_limit", "save_on_each_node",
            "eval_every", "eval_num_samples", "eval_num_reference",
            "report_to", "log_model", "wandb_project", "run_name", "max_nonfinite_steps",
            "data_loading", "num_workers",  # speed: the same batches either way
            "channels_last", "compile", "compile_backend", "compile_mode",
            "gradient_checkpointing", "batch_size", "gradient_accumulation_steps",
            "fsdp_cpu_offload",
        }
    )  # fmt: skip

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
        None,
        "DataLoader workers per process for --data-loading stream, and decoding its --vae "
        "latent cache (default: cores/procs)",
    )
    # Speed (bench/train_step.py measures them).
    channels_last: bool = option(False, "channels-last memory format for the network (GPUs)")
    compile: bool = option(
        False,
        "torch.compile the network for training and sampling (the first run compiles for "
        "minutes; later runs read inductor's cache)",
    )
    compile_backend: CompileBackend = option(
        "inductor", "torch.compile backend (aot_eager: no codegen)"
    )
    compile_mode: CompileMode = option(
        "default",
        "inductor's mode; default: fused kernels, reduce-overhead: also replayed as CUDA graphs "
        "(a small model's step on a GPU is bound by kernel launches), max-autotune: also tuned",
    )
    gradient_checkpointing: bool = option(
        False, "recompute the UNet's activations in the backward pass: less memory, more compute"
    )
    # Memory: sharding (docs/sharding.md).
    sharding: Sharding = option(
        "none",
        "none: every process holds the whole model, its gradients, EMA and optimizer state "
        "(DDP); fsdp: each holds 1/N of each (FSDP2), for a model that does not fit one device; "
        "hsdp: sharded within each node, a whole copy per node (several nodes)",
    )
    hsdp_shard_size: int | None = option(
        None,
        "with --sharding hsdp: the processes that share one copy of the model (default: one "
        "node's); the number of processes must be a multiple of it",
    )
    fsdp_cpu_offload: bool = option(
        False,
        "with --sharding fsdp: keep the shards of weights, gradients and optimizer state in CPU "
        "memory (the optimizer steps on the CPU): slower, for what does not fit even sharded",
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

    def freeze(self) -> None:
        """The config is resolved (flags, the data's size, what --init-from fills): from here
        on the run only reads it, so what the checkpoints record is what trained."""
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: object) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"the training config is resolved and frozen: {name} cannot change now"
            )
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        check_fields(self)
        check_dataset_name(self.dataset)
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise InputError(f"{self.output_dir} is a file, not a folder", "output_dir")
        try:
            check_compile_options(self.compile_backend, self.compile_mode)
        except ValueError as err:
            raise InputError(str(err), "compile_mode") from None
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
                raise InputError(f"--max-train-time {err}") from None
        # Flags that would do nothing where given are refused, not ignored: the user meant
        # something by them (a warning would scroll by in the log of a run that ignores them).
        for name in ("hub_model_id", "hub_private"):
            require(
                self.push_to_hub or not getattr(self, name),
                f"{flag_name(name)} applies with --push-to-hub only; add it, or drop "
                f"{flag_name(name)}",
            )
        for name, default in (("compile_backend", "inductor"), ("compile_mode", "default")):
            require(
                self.compile or getattr(self, name) == default,
                f"{flag_name(name)} applies with --compile only; add it, or drop {flag_name(name)}",
            )
        # Only a class-conditional run (train_ddpm.py --class-conditional) reads labels.
        if self.label_column is not None and not getattr(self, "class_conditional", False):
            raise InputError(
                "names the class labels of --class-conditional training: add "
                "--class-conditional, or drop --label-column"
                if hasattr(self, "class_conditional")
                else "names class labels, and this script trains on images alone: drop it",
                "label_column",
            )
        require(
            self.sharding != "none" or not self.fsdp_cpu_offload,
            "--fsdp-cpu-offload applies with --sharding fsdp or hsdp only; add it, or drop "
            "--fsdp-cpu-offload",
        )
        require(
            self.hsdp_shard_size is None or self.sharding == "hsdp",
            "--hsdp-shard-size applies with --sharding hsdp only; add it, or drop "
            "--hsdp-shard-size",
        )
        require(
            self.hsdp_shard_size is None or self.hsdp_shard_size >= 2,
            f"--hsdp-shard-size must be >= 2 or none, got {self.hsdp_shard_size}",
        )
        if self.sharding != "none":
            for name in ("save_on_each_node", "compile"):
                require(
                    not getattr(self, name),
                    f"{flag_name(name)} does not work with --sharding {self.sharding} yet "
                    + (
                        "(each process writes its own shard of a checkpoint: the run directory "
                        "must be one folder every node sees)"
                        if name == "save_on_each_node"
                        else "(torch.compile of a sharded network is not wired up)"
                    )
                    + f": drop {flag_name(name)}, or use --sharding none",
                )
        require(
            self.max_nonfinite_steps >= 1,
            f"--max-nonfinite-steps must be >= 1, got {self.max_nonfinite_steps}",
        )
        require(
            not self.log_model or self.report_to in ("wandb", "all"),
            f"--log-model uploads the exports to wandb: add --report-to wandb (or all), or drop "
            f"--log-model (--report-to is {self.report_to})",
        )
        require(
            self.resume in ("latest", "none") or Path(self.resume).is_dir(),
            f"--resume must be latest, none or an existing checkpoint folder, got {self.resume!r}",
        )

    def taken_from_the_data(self) -> dict[str, tuple[int | None, str]]:
        """For --dry-run: --resolution and --channels not given, as the run will take them
        from the images (their headers, read now for local data) and where they come from;
        None for a hub dataset, which only the run reads."""
        missing = [name for name in ("resolution", "channels") if getattr(self, name) is None]
        if not missing:
            return {}
        shape = peek_image_size(
            self.dataset, self.resolution, self.channels, self.dataset_config, self.split,
            self.image_column, self.max_images,
        )  # fmt: skip
        if shape is None:
            return {name: (None, "from the images, when the run loads them") for name in missing}
        found = dict(zip(("resolution", "channels"), shape, strict=True))
        return {
            name: (found[name], f"what the run takes from the data; {flag_name(name)} to choose")
            for name in missing
        }

    def check_image_size(self) -> None:
        """--resolution and --channels, as given or once taken from the data (`start_run`)."""
        require(
            self.resolution is None or self.resolution >= 4,
            f"--resolution must be >= 4, got {self.resolution}",
        )
        require(self.channels in (None, 1, 3), f"--channels must be 1 or 3, got {self.channels}")
