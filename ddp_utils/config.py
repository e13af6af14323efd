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
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ddp_utils.data.load import DataLoading
from ddp_utils.data.source import default_channels, default_resolution
from ddp_utils.errors import flag_name
from ddp_utils.files import write_text

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    aliases: typing.Sequence[str] = (),
    positional: bool = False,
) -> Any:
    """A dataclass field carrying its CLI help (and alias flags). Choices come from the
    field's `Literal[...]` type."""
    metadata: dict[str, Any] = {"help": help, "aliases": tuple(aliases), "positional": positional}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def require(condition: bool, message: str) -> None:
    """Validation in a config's `__post_init__`: a ValueError naming the flag."""
    if not condition:
        raise ValueError(message)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` (optionally `| None`) type, else None."""
    base, _ = _unwrap_optional(tp)
    return typing.get_args(base) if typing.get_origin(base) is Literal else None


def _parse_scalar(tp: Any, optional: bool):
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if typing.get_origin(tp) is Literal:
            return text  # argparse checks the choices
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
    choices = _choices(base)
    if choices is not None:
        if value not in choices:
            raise ValueError(
                f"{flag_name(name)} must be one of {', '.join(map(str, choices))}, got {value!r}"
            )
        return value
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{flag_name(name)}: expected true or false, got {value!r}")
    if base in (int, float) and isinstance(value, bool):  # YAML's `yes` is not a number
        raise ValueError(f"{flag_name(name)}: expected {base.__name__}, got {value!r}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float):
        if not value.is_integer():  # 3.7 -> 3 would be a silent change of the user's value
            raise ValueError(f"{flag_name(name)}: expected a whole number, got {value!r}")
        return int(value)
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
        choices = _choices(hints[field.name])
        if choices is not None:
            kwargs["choices"] = choices
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
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        choices = _choices(hints[field.name])
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(parser.parse_args(_hyphenate_flags(argv, parser)))
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


def _hyphenate_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept `--batch_size` (the spelling of diffusers' examples) for `--batch-size`."""
    known = set(parser._option_string_actions)
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name.startswith("--") and name not in known:
            hyphenated = "--" + name[2:].replace("_", "-")
            if hyphenated in known:
                arg = hyphenated + sep + value
        out.append(arg)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config (YAML), atomically."""
    write_text(path, to_yaml(cfg))


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


# --------------------------------------------------------------------------- shared training config


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
    report_to: Literal["wandb", "none"] = option("wandb", "experiment tracker")
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
        if self.resolution is None:
            self.resolution = default_resolution(self.dataset)
        if self.channels is None:
            self.channels = default_channels(self.dataset)
        require(self.resolution >= 4, f"--resolution must be >= 4, got {self.resolution}")
        require(self.channels in (1, 3), f"--channels must be 1 or 3, got {self.channels}")
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
        require(
            self.max_nonfinite_steps >= 1,
            f"--max-nonfinite-steps must be >= 1, got {self.max_nonfinite_steps}",
        )
        require(
            self.resume in ("latest", "none") or Path(self.resume).is_dir(),
            f"--resume must be latest, none or an existing checkpoint folder, got {self.resume!r}",
        )
