"""Dataclass configs with a CLI generated from them.

One `@dataclass` per script is the single source of truth: every field becomes a kebab-case
flag whose help is the field's `help` metadata, a `--config FILE` (YAML or JSON) can set the
same fields (flags given on the command line win), and the resolved config is written into
the run directory so a run can be reproduced from its folder alone.

Validation lives in each config's `__post_init__` and raises `ValueError` naming the flag, so
a bad value stops the run before any compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    choices: typing.Sequence[Any] | None = None,
    aliases: typing.Sequence[str] = (),
    positional: bool = False,
) -> Any:
    """A dataclass field carrying its CLI help (and optional choices, alias flags)."""
    metadata: dict[str, Any] = {"help": help, "aliases": tuple(aliases), "positional": positional}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_scalar(tp: Any, optional: bool):
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if tp is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return tp(text)

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Coerce a value read from a config file to the field's type, or raise a ValueError."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{flag_name(name)}: null is not allowed")
    if typing.get_origin(base) in (list, tuple):
        (item_type, *_) = typing.get_args(base) or (str,)
        if not isinstance(value, list | tuple):
            raise ValueError(f"{flag_name(name)}: expected a list, got {value!r}")
        return [_coerce(name, item_type, v) for v in value]
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{flag_name(name)}: expected true or false, got {value!r}")
    if base in (int, float) and isinstance(value, bool):  # YAML's `yes` is not a number
        raise ValueError(f"{flag_name(name)}: expected {base.__name__}, got {value!r}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float, str) and not isinstance(value, base):
        try:
            return base(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{flag_name(name)}: expected {base.__name__}, got {value!r}"
            ) from None
    return value


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON file setting any of the fields")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp, optional = _unwrap_optional(hints[field.name])
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": field.metadata.get("help", ""),
        }
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        )
        kwargs["help"] += f" (default: {default})"
        if field.metadata.get("positional"):
            parser.add_argument(
                field.name,
                nargs="?",
                type=_parse_scalar(tp, optional),
                **{k: v for k, v in kwargs.items() if k != "dest"},
            )
            continue
        flags = [flag_name(field.name), *field.metadata.get("aliases", ())]
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) in (list, tuple):
            (item_type, *_) = typing.get_args(tp) or (str,)
            parser.add_argument(*flags, nargs="*", type=_parse_scalar(item_type, False), **kwargs)
        else:
            parser.add_argument(*flags, type=_parse_scalar(tp, optional), **kwargs)
    return parser


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"--config: file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"--config: {path} does not parse: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of field names to values")
    # Accept both `batch_size` and `batch-size` spellings.
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def check_choices(cfg: Any) -> None:
    """Values set from a file or in code get the same choice check as argparse gives flags."""
    for field in dataclasses.fields(cfg):
        choices = field.metadata.get("choices")
        value = getattr(cfg, field.name)
        if choices is not None and value is not None and value not in choices:
            raise ValueError(
                f"{flag_name(field.name)} must be one of {', '.join(map(str, choices))}, "
                f"got {value!r}"
            )


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build a config from a mapping (a config file, a checkpoint's config.json)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        hints_text = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints_text.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ValueError(
            f"{source}: unknown field(s) {', '.join(hints_text)}; "
            f"known fields: {', '.join(sorted(names))}"
        )
    cfg = cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})
    check_choices(cfg)
    return cfg


def parse_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """Parse the command line into `cls`; print and exit on `--dry-run` or a bad value.

    Precedence: dataclass defaults < `--config` file < command-line flags.
    """
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config")
    dry_run = args.pop("dry_run")
    try:
        values = read_config_file(config_file) if config_file else {}
        values.update(args)
        cfg = config_from_dict(cls, values, f"--config {config_file}" if config_file else "config")
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if dry_run:
        print(to_yaml(cfg), end="")
        sys.exit(0)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config (YAML), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    from ddp_utils.checkpoint import unique_suffix

    tmp = path.with_name(f"{path.name}.{unique_suffix()}.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


# --------------------------------------------------------------------------- shared training config


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


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
    max_images: int | None = option(None, "use only the first N images of the dataset")
    resolution: int | None = option(
        None,
        "training resolution (square; smaller images are upscaled); "
        "default: the dataset's native size, 32 otherwise",
    )
    channels: int | None = option(
        None, "1 (grayscale) or 3 (RGB); default: 1 for digits/mnist/fashion_mnist, else 3"
    )
    center_crop: bool = option(True, "resize the shorter side then center-crop (else squash)")
    random_flip: bool = option(False, "random horizontal flip (on the device)")
    data_loading: str = option(
        "auto",
        "memory: decode once into a uint8 tensor on the device; stream: decode per batch in "
        "DataLoader workers; auto: memory when the decoded set is at most 4 GiB",
        choices=("auto", "memory", "stream"),
    )
    num_workers: int | None = option(
        None, "DataLoader workers per process for --data-loading stream (default: cores/procs)"
    )
    # Speed (bench/train_step.py measures them).
    channels_last: bool = option(False, "channels-last memory format for the network (GPUs)")
    compile: bool = option(False, "torch.compile the network (first steps compile: minutes)")
    compile_backend: str = option("inductor", "torch.compile backend (aot_eager: no codegen)")
    # Run.
    output_dir: str = option("runs/train", "run directory: checkpoints, export, samples, logs")
    max_steps: int = option(2000, "number of optimizer steps")
    batch_size: int = option(64, "per-device batch size (global = this x processes x accumulation)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(1e-3, "peak learning rate")
    lr_schedule: str = option("constant", "after warmup", choices=("constant", "cosine"))
    lr_warmup_steps: int = option(0, "linear warmup, in optimizer steps")
    weight_decay: float = option(0.0, "AdamW/Adam weight decay")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    mixed_precision: str | None = option(
        None,
        "autocast dtype (default: the accelerate config's, else no)",
        choices=("no", "fp16", "bf16"),
    )
    seed: int = option(0, "seed for data order, noise and initial weights")
    # Checkpoints and logging.
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
    report_to: str = option("wandb", "experiment tracker", choices=("wandb", "none"))
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
        from ddp_utils.data import default_channels, default_resolution

        check_choices(self)
        if self.resolution is None:
            self.resolution = default_resolution(self.dataset)
        if self.channels is None:
            self.channels = default_channels(self.dataset)
        _check(self.resolution >= 4, f"--resolution must be >= 4, got {self.resolution}")
        _check(self.channels in (1, 3), f"--channels must be 1 or 3, got {self.channels}")
        _check(self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(
            self.gradient_accumulation_steps >= 1,
            f"--gradient-accumulation-steps must be >= 1, got {self.gradient_accumulation_steps}",
        )
        _check(
            0 < self.learning_rate < 1,
            f"--learning-rate must be in (0, 1), got {self.learning_rate}",
        )
        _check(self.lr_warmup_steps >= 0, "--lr-warmup-steps must be >= 0")
        _check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"--max-grad-norm must be > 0 or none, got {self.max_grad_norm}",
        )
        _check(
            self.max_images is None or self.max_images >= 1,
            f"--max-images must be >= 1, got {self.max_images}",
        )
        for name in ("checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, f"{flag_name(name)} must be >= 1")
        _check(self.sample_every >= 0, "--sample-every must be >= 0")
        _check(
            self.num_workers is None or self.num_workers >= 0,
            f"--num-workers must be >= 0 or none, got {self.num_workers}",
        )
        _check(
            self.compile_backend in ("inductor", "aot_eager", "eager", "cudagraphs"),
            "--compile-backend must be inductor, aot_eager, eager or cudagraphs, "
            f"got {self.compile_backend!r}",
        )
        _check(self.num_sample_images >= 1, "--num-sample-images must be >= 1")
        if self.max_train_time is not None:
            from ddp_utils.guard import parse_duration

            parse_duration(self.max_train_time)
        _check(
            self.max_nonfinite_steps >= 1,
            f"--max-nonfinite-steps must be >= 1, got {self.max_nonfinite_steps}",
        )
        _check(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            "--checkpoints-total-limit must be >= 1 or none",
        )
        _check(
            self.resume in ("latest", "none") or Path(self.resume).is_dir(),
            f"--resume must be latest, none or an existing checkpoint folder, got {self.resume!r}",
        )
