"""EDM's section of the training config: its flags, their checks, and what a fine-tune or a
resume takes from a trained model (its sigma_data)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ddp_utils.config import option, require
from ddp_utils.errors import InputError

SECTION = "EDM objective (--objective edm; the paper's CIFAR-10 values)"
PIXEL_SIGMA_DATA = 0.5  # EDM's, for pixels in [-1, 1] (Karras et al. 2022)


@dataclass
class EDMOptions:
    """The EDM objective's section of the training config."""

    p_mean: float = option(
        -1.2, "training noise levels have ln(sigma) ~ N(p_mean, p_std^2)", section=SECTION
    )
    p_std: float = option(1.2, "see --p-mean", section=SECTION)
    sigma_data: float | None = option(
        None,
        "standard deviation of the data; default: 0.5 for pixels in [-1, 1], with --vae the "
        "measured standard deviation of the scaled latents, with --init-from its model's",
        section=SECTION,
    )
    sigma_min: float = option(0.002, "the sampler's lowest noise level", section=SECTION)
    sigma_max: float = option(
        80.0, "the sampler's highest noise level (its start)", section=SECTION
    )
    rho: float = option(
        7.0, "spacing of the sampler's noise levels (7: dense near 0)", section=SECTION
    )


def check_options(cfg: Any) -> None:
    require(cfg.p_std > 0, f"--p-std must be > 0, got {cfg.p_std}")
    require(
        cfg.sigma_data is None or cfg.sigma_data > 0,
        f"--sigma-data must be > 0, got {cfg.sigma_data}",
    )
    require(
        0 < cfg.sigma_min < cfg.sigma_max,
        f"--sigma-min and --sigma-max need 0 < min < max, got {cfg.sigma_min}, {cfg.sigma_max}",
    )
    require(cfg.rho > 0, f"--rho must be > 0, got {cfg.rho}")


def take_from_model(cfg: Any, scheduler_config: Mapping[str, Any], source: str) -> None:
    """A fine-tune keeps its model's sigma_data (refusing another one given)."""
    sigma_data = scheduler_config.get("sigma_data", PIXEL_SIGMA_DATA)
    if cfg.sigma_data is None:
        cfg.sigma_data = sigma_data
    elif sigma_data != cfg.sigma_data:
        raise InputError(
            f"{source} was trained with --sigma-data {sigma_data}: pass it", "init_from"
        )


def resolve(cfg: Any, checkpoint_state: Mapping[str, Any] | None, data_std: float) -> None:
    """sigma_data when --sigma-data is not given (nor filled by --init-from): what a resumed
    checkpoint was trained with, else the data's standard deviation (`data_std`: 0.5 for
    pixels in [-1, 1]; for latents the scaled latents', measured: EDM's 0.5 assumes pixels in
    [-1, 1], and on unit-variance latents it would skew every preconditioning coefficient)."""
    if cfg.sigma_data is not None:
        return
    saved = (checkpoint_state or {}).get("scheduler_config")
    if saved and "sigma_data" in saved:
        cfg.sigma_data = float(saved["sigma_data"])
        return
    cfg.sigma_data = float(f"{data_std:.4g}")


DEFAULTS = {"p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def leave_unused(cfg: Any) -> None:
    """Another objective's run: EDM's flags are refused unless at their defaults (which a
    config file may hold), and sigma_data is recorded as 0.5, as such configs always have."""
    for name, default in {**DEFAULTS, "sigma_data": PIXEL_SIGMA_DATA}.items():
        value = getattr(cfg, name)
        require(
            value is None or value == default,
            f"--{name.replace('_', '-')} applies to --objective edm only",
        )
    if cfg.sigma_data is None:
        cfg.sigma_data = PIXEL_SIGMA_DATA
