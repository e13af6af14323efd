"""Rectified flow's section of the training config: its flags, their checks, and what a
fine-tune or a resume takes from a trained model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ddp_utils.config import option, require
from ddp_utils.errors import InputError
from diffusion.kinds.flow.formulation import NUM_TRAIN_TIMESTEPS, TimeSampling

SECTION = "Rectified flow objective (--objective flow; Esser et al. 2024's values)"
# SD3's resolution-dependent shift: sqrt(m / n), m the values the network denoises and n those
# of its 256x256 base (32x32 latents of 16 channels), where the shift is 1 (3 at 1024x1024
# in practice, 4 by the rule).
BASE_VALUES = 32 * 32 * 16


@dataclass
class FlowOptions:
    """The rectified flow objective's section of the training config."""

    time_sampling: TimeSampling = option(
        "logit-normal",
        "training times t: logit-normal (t = sigmoid(N(mean, std^2)), SD3's best), uniform, or "
        "mode (SD3's mode sampling, --mode-scale)",
        section=SECTION,
    )
    logit_mean: float = option(0.0, "mean of logit(t) with logit-normal times", section=SECTION)
    logit_std: float = option(
        1.0, "standard deviation of logit(t) with logit-normal times", section=SECTION
    )
    mode_scale: float = option(1.29, "the scale of mode sampling (SD3's 1.29)", section=SECTION)
    time_shift: str = option(
        "1",
        "shift s of the times, t' = s t / (1 + (s - 1) t), in training and in the export's "
        "sampler (s > 1: more time at high noise, what larger images need); 'resolution': SD3's "
        "rule sqrt(m / 16384), m the values the network denoises (1 at 32x32x16 latents)",
        section=SECTION,
    )


def parse_shift(text: str) -> float | None:
    """The shift a --time-shift value gives (None: 'resolution', known once the data is)."""
    if text.strip().lower() == "resolution":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"--time-shift takes a number > 0 or 'resolution', got {text!r}")
    return value


def check_options(cfg: Any) -> None:
    parse_shift(cfg.time_shift)
    require(
        math.isfinite(cfg.logit_std) and cfg.logit_std > 0,
        f"--logit-std must be > 0, got {cfg.logit_std}",
    )
    require(math.isfinite(cfg.logit_mean), f"--logit-mean must be finite, got {cfg.logit_mean}")
    # Mode sampling keeps t in [0, 1] only for scales in [-1, 2/(pi - 2)] (Esser et al.).
    require(
        -1 <= cfg.mode_scale <= 2 / (math.pi - 2),
        f"--mode-scale must be in [-1, {2 / (math.pi - 2):.3f}], got {cfg.mode_scale}",
    )


def leave_unused(cfg: Any) -> None:
    """Another objective's run: the flow flags are refused unless at their defaults."""
    for name, default in (
        ("time_sampling", "logit-normal"), ("logit_mean", 0.0), ("logit_std", 1.0),
        ("mode_scale", 1.29), ("time_shift", "1"),
    ):  # fmt: skip
        require(
            getattr(cfg, name) == default,
            f"--{name.replace('_', '-')} applies to --objective flow only",
        )


def take_from_model(cfg: Any, scheduler_config: Mapping[str, Any], source: str) -> None:
    """A flow model's network reads 1000 t: refuse one trained on another scale. (Its shift is
    a training choice a fine-tune may change: --time-shift, default 1.)"""
    steps = scheduler_config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)
    if steps != NUM_TRAIN_TIMESTEPS:
        raise InputError(
            f"{source} reads its time as {steps} t; this toolkit's flow models read "
            f"{NUM_TRAIN_TIMESTEPS} t",
            "init_from",
        )


def resolve(cfg: Any, data_shape: tuple[int, int, int]) -> None:
    """--time-shift resolution: SD3's rule for the values the network denoises."""
    if parse_shift(cfg.time_shift) is None:
        values = math.prod(data_shape)
        cfg.time_shift = f"{math.sqrt(values / BASE_VALUES):.4g}"
