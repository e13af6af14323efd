"""DDPM's section of the training config: its flags, their checks, and what a fine-tune or a
resume takes from a trained model's noise schedule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from diffusers import DDPMScheduler

from ddp_utils.config import option, require
from ddp_utils.errors import InputError
from diffusion.kinds.ddpm.formulation import SCHEDULE_DEFAULTS, BetaSchedule, PredictionType

SECTION = "DDPM objective (--objective ddpm; unset: --init-from's, else the defaults)"


@dataclass
class DDPMOptions:
    """The DDPM objective's section of the training config."""

    prediction_type: PredictionType | None = option(
        None,
        f"network target (default: {SCHEDULE_DEFAULTS['prediction_type']})",
        section=SECTION,
    )
    beta_schedule: BetaSchedule | None = option(
        None,
        f"noise schedule (default: {SCHEDULE_DEFAULTS['beta_schedule']})",
        section=SECTION,
    )
    num_train_timesteps: int | None = option(
        None,
        f"diffusion timesteps T (default: {SCHEDULE_DEFAULTS['num_train_timesteps']})",
        section=SECTION,
    )
    beta_start: float | None = option(
        None,
        f"first beta of the linear and scaled_linear schedules (default: "
        f"{SCHEDULE_DEFAULTS['beta_start']:g}; Stable Diffusion's 0.00085)",
        section=SECTION,
    )
    beta_end: float | None = option(
        None,
        f"last beta of the linear and scaled_linear schedules (default: "
        f"{SCHEDULE_DEFAULTS['beta_end']:g}; Stable Diffusion's 0.012)",
        section=SECTION,
    )
    min_snr_gamma: float | None = option(
        None, "min-SNR-gamma loss weighting (e.g. 5); none: off", section=SECTION
    )


def check_options(cfg: Any) -> None:
    """A DDPM run's section: given values checked; unset ones take the defaults, except under
    --init-from, whose model's schedule fills them (`take_from_model`)."""
    # End points other than the defaults (which a resolved config file holds) do nothing for
    # the cosine schedule: refused.
    given_ends = [name for name in ("beta_start", "beta_end")
                  if getattr(cfg, name) not in (None, SCHEDULE_DEFAULTS[name])]  # fmt: skip
    if cfg.init_from is None:
        fill_defaults(cfg)
    require(
        cfg.beta_schedule != "squaredcos_cap_v2" or not given_ends,
        f"--{given_ends[0].replace('_', '-') if given_ends else ''} applies to the linear and "
        "scaled_linear schedules; the cosine one (squaredcos_cap_v2) has no end points: give "
        "--beta-schedule linear or scaled_linear, or drop it",
    )
    require(
        cfg.num_train_timesteps is None or cfg.num_train_timesteps >= 2,
        f"--num-train-timesteps must be >= 2, got {cfg.num_train_timesteps}",
    )
    for name in ("beta_start", "beta_end"):
        value = getattr(cfg, name)
        require(
            value is None or 0 < value < 1,
            f"--{name.replace('_', '-')} must be in (0, 1), got {value}",
        )
    require(
        cfg.beta_start is None or cfg.beta_end is None or cfg.beta_start < cfg.beta_end,
        f"--beta-start ({cfg.beta_start}) must be below --beta-end ({cfg.beta_end})",
    )
    require(
        cfg.min_snr_gamma is None or cfg.min_snr_gamma > 0,
        f"--min-snr-gamma must be > 0 or none, got {cfg.min_snr_gamma}",
    )
    # A sampler of more steps than the training timesteps fails at the first grid (after
    # training steps that the last checkpoint does not hold): refused here.
    require(
        cfg.num_train_timesteps is None or cfg.sample_steps <= cfg.num_train_timesteps,
        f"--sample-steps {cfg.sample_steps} is more than the {cfg.num_train_timesteps} training "
        f"timesteps; give at most {cfg.num_train_timesteps}",
    )


def leave_unused(cfg: Any, objective: str) -> None:
    """A run of another objective: DDPM's flags are refused (but at their defaults, which a
    config file may hold), and the section records the defaults, as configs always have."""
    for name, value in {**SCHEDULE_DEFAULTS, "min_snr_gamma": None}.items():
        require(
            getattr(cfg, name) in (None, value),
            f"--{name.replace('_', '-')} applies to --objective ddpm only",
        )
    fill_defaults(cfg)


def fill_defaults(cfg: Any) -> None:
    for name, value in SCHEDULE_DEFAULTS.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)


def training_schedule(
    given: dict[str, Any], scheduler_config: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """The schedule fields (`SCHEDULE_DEFAULTS`' keys) to train with: those given (not None),
    the rest from a model's DDPM scheduler config (else the toolkit's defaults). Refuses a schedule
    `make_train_scheduler` cannot rebuild, naming why."""
    # A key the model's config lacks (configs older than the key) means diffusers' default,
    # which is what the model was trained with; only a model without any schedule gets ours.
    fallback = dict(DDPMScheduler().config) if scheduler_config else SCHEDULE_DEFAULTS
    values = {
        name: given[name] if given.get(name) is not None
        else scheduler_config.get(name, fallback[name])
        for name in SCHEDULE_DEFAULTS
    }  # fmt: skip
    problems = []
    for name, allowed in (
        ("beta_schedule", get_args(BetaSchedule)),
        ("prediction_type", get_args(PredictionType)),
    ):
        if values[name] not in allowed:
            problems.append(f"its {name} is {values[name]!r} (supported: {', '.join(allowed)})")
    if scheduler_config.get("trained_betas") is not None:
        problems.append("it was trained with an explicit list of betas (trained_betas)")
    if scheduler_config.get("rescale_betas_zero_snr"):
        problems.append("its betas are rescaled to zero terminal SNR (rescale_betas_zero_snr)")
    if problems:
        raise InputError(
            f"the noise schedule of {source} cannot be rebuilt: "
            + "; ".join(problems)
            + ". Give --beta-schedule and --prediction-type to train with another schedule",
            "init_from",
        )
    return values


def take_from_model(cfg: Any, scheduler_config: Mapping[str, Any], source: str) -> None:
    """Fill the schedule flags not given from a model's scheduler config."""
    given = {name: getattr(cfg, name) for name in SCHEDULE_DEFAULTS}
    for name, value in training_schedule(given, scheduler_config, source).items():
        setattr(cfg, name, value)
