r"""Train a diffusion model: DDPM (v- or noise prediction over 1000 timesteps) or EDM (Karras et al.
2022's preconditioned denoiser), with EMA, sample grids and an export diffusers loads.

    # built-in digits on a CPU (the README's main job, ~12 minutes on 2 cores):
    python train_ddpm.py
    # the same data and budget with the EDM objective (Heun sampler, 18 steps):
    python train_ddpm.py --objective edm --output-dir runs/edm
    # CIFAR-10 on N GPUs in bf16 (edit the config for your machine):
    accelerate launch --config_file accelerate_configs/1node_8gpu_bf16.yaml train_ddpm.py \
        --dataset cifar10 --preset unet-18.5m --random-flip --mixed-precision bf16 \
        --batch-size 32 --max-steps 200000 --output-dir runs/cifar10-unet-18.5m
    # sample from the exported pipeline (diffusers' DDPMPipeline/DDIMPipeline load it too;
    # an EDM export: DiffusionPipeline.from_pretrained(path, trust_remote_code=True,
    #     use_safetensors=True)):
    python sample.py runs/ddpm/pipeline --scheduler ddim --num-inference-steps 50
    python sample.py runs/edm/pipeline

Rerunning the same command resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries below load (~10 s): exit 130 quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import logging
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ddp_utils import loop
from ddp_utils.cli import cli_main
from ddp_utils.config import option, parse_config, require
from ddp_utils.distributed import main_process_first
from ddp_utils.errors import InputError
from ddp_utils.run import Run, start_run
from ddp_utils.train_config import TrainConfig
from diffusion.ddpm import SCHEDULE_DEFAULTS, BetaSchedule, PredictionType, make_train_scheduler
from diffusion.edm import make_edm_scheduler
from diffusion.kinds import kind_named
from diffusion.loading import load_for_sampling
from diffusion.networks import (
    BACKBONE_CLASSES,
    DEFAULT_PRESETS,
    Backbone,
    backbone_of,
    build_backbone,
    check_preset,
    prepare_loaded,
    preset_backbone,
)
from diffusion.pretrained import check_init_model, resolve_model_source, training_schedule
from diffusion.sampling import (
    DEFAULT_DDIM_ETA,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLERS_BY_TASK,
    SamplerName,
)

logger = logging.getLogger("ddp_diffusion")
Objective = Literal["ddpm", "edm"]


@dataclass
class DDPMConfig(TrainConfig):
    """DDPM or EDM training; defaults make readable digits in ~12 minutes on a 2-core CPU."""

    objective: Objective = option(
        "ddpm",
        "ddpm: predict the noise of T discrete timesteps (Ho et al. 2020); edm: the "
        "preconditioned denoiser on log-normal noise levels (Karras et al. 2022)",
    )
    backbone: Backbone | None = option(
        None,
        "the network: unet (UNet2DModel) or dit (a diffusion transformer, "
        "DiTTransformer2DModel); default: what --preset implies, else unet (with --init-from: "
        "its network's)",
    )
    preset: str | None = option(
        None,
        "network preset: UNets digits-small, unet-4.7m, unet-18.5m, ddpm-cifar10; DiTs "
        "dit-digits, dit-s-2, dit-b-2, dit-l-2, dit-xl-2 (the DiT paper's sizes); or a JSON "
        f"file of the network's arguments; default: {DEFAULT_PRESETS['unet']} (unet), "
        f"{DEFAULT_PRESETS['dit']} (dit), none with --init-from (the network is its)",
    )
    init_from: str | None = option(
        None,
        "start from a trained model's weights (fine-tuning): an export of this toolkit, a "
        "diffusers DDPMPipeline or UNet2DModel folder, a checkpoint, or a hub id such as "
        "google/ddpm-cifar10-32; its size, channels and classes must match the data, and its "
        "noise schedule is used unless given here. A run with checkpoints resumes instead",
    )
    # DDPM (--objective ddpm); unset: --init-from's, else the defaults shown.
    prediction_type: PredictionType | None = option(
        None, f"DDPM: network target (default: {SCHEDULE_DEFAULTS['prediction_type']})"
    )
    beta_schedule: BetaSchedule | None = option(
        None, f"DDPM: noise schedule (default: {SCHEDULE_DEFAULTS['beta_schedule']})"
    )
    num_train_timesteps: int | None = option(
        None, f"DDPM: diffusion timesteps T (default: {SCHEDULE_DEFAULTS['num_train_timesteps']})"
    )
    min_snr_gamma: float | None = option(
        None, "DDPM: min-SNR-gamma loss weighting (e.g. 5); none: off"
    )
    # EDM (--objective edm); the paper's CIFAR-10 values.
    p_mean: float = option(-1.2, "EDM: training noise levels have ln(sigma) ~ N(p_mean, p_std^2)")
    p_std: float = option(1.2, "EDM: see --p-mean")
    sigma_data: float = option(0.5, "EDM: standard deviation of the data (pixels in [-1, 1])")
    sigma_min: float = option(0.002, "EDM: the sampler's lowest noise level")
    sigma_max: float = option(80.0, "EDM: the sampler's highest noise level (its start)")
    rho: float = option(7.0, "EDM: spacing of the sampler's noise levels (7: dense near 0)")
    # Class-conditional generation with classifier-free guidance (Ho & Salimans 2022).
    class_conditional: bool = option(
        False,
        "train on the dataset's class labels (digits, MNIST, CIFAR-10, an image folder with one "
        "subfolder per class) and sample with classifier-free guidance",
    )
    label_dropout: float = option(
        0.1, "class-conditional: share of labels replaced by 'no class' (what guidance needs)"
    )
    sample_guidance_scale: float = option(
        1.5,
        "class-conditional: guidance w of the grids and --eval-every, stored in the export "
        "(0: unconditional, 1: conditional, > 1: more like the class; 1.5 measured best on "
        "digits: FID as w = 1, the asked class 99.8% of the time)",
    )
    # Training.
    learning_rate: float = option(4e-4, "peak learning rate")
    lr_warmup_steps: int = option(200, "linear warmup, in optimizer steps")
    batch_size: int = option(64, "per-device batch size")
    max_steps: int = option(4000, "number of optimizer steps")
    output_dir: str = option("runs/ddpm", "run directory: checkpoints, export, samples, logs")
    # Pictures and evaluation.
    sample_scheduler: SamplerName | None = option(
        None,
        "sampler of the logged grids and --eval-every (sample.py's --scheduler); "
        f"default: {DEFAULT_SAMPLER['ddpm']} (ddpm), {DEFAULT_SAMPLER['edm']} (edm)",
    )
    sample_steps: int | None = option(
        None, "sampler steps of the grids and --eval-every (default: the sampler's, as sample.py)"
    )
    sample_eta: float | None = option(
        None,
        f"DDIM noise scale of the grids and --eval-every (default with ddim: {DEFAULT_DDIM_ETA}, "
        "as sample.py; 0: deterministic)",
    )
    sample_every: int = option(1000, "log a sample grid every N steps (0: only at the end)")

    # Also free on resume: how the grids are sampled, the export's default guidance, and
    # --init-from (a resumed run reads its checkpoint, not that model).
    may_change_on_resume = TrainConfig.may_change_on_resume | {
        "sample_scheduler", "sample_eta", "sample_guidance_scale", "init_from",
    }  # fmt: skip

    def __post_init__(self) -> None:
        if self.sample_scheduler is None and self.objective in DEFAULT_SAMPLER:
            self.sample_scheduler = DEFAULT_SAMPLER[self.objective]
        if self.sample_steps is None and self.sample_scheduler in DEFAULT_STEPS:
            self.sample_steps = DEFAULT_STEPS[self.sample_scheduler]
        if self.sample_eta is None:
            self.sample_eta = DEFAULT_DDIM_ETA if self.sample_scheduler == "ddim" else 0.0
        super().__post_init__()
        if self.objective == "edm":
            self._check_edm()
        if self.init_from is None:
            implied = None if self.preset is None else preset_backbone(self.preset)
            self.backbone = self.backbone or implied or "unet"
            self.preset = self.preset or DEFAULT_PRESETS[self.backbone]
            check_preset(self.backbone, self.preset, self.resolution)  # stops --dry-run too
        else:
            require(
                self.preset is None,
                "--preset and --init-from both choose the network: drop --preset (the "
                "network, its size and its weights come from --init-from)",
            )
        if self.init_from is None or self.objective == "edm":
            for name, value in SCHEDULE_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        require(
            self.num_train_timesteps is None or self.num_train_timesteps >= 2,
            f"--num-train-timesteps must be >= 2, got {self.num_train_timesteps}",
        )
        require(
            self.min_snr_gamma is None or self.min_snr_gamma > 0,
            f"--min-snr-gamma must be > 0 or none, got {self.min_snr_gamma}",
        )
        samplers = SAMPLERS_BY_TASK[self.objective]
        require(
            self.sample_scheduler in samplers,
            f"--sample-scheduler {self.sample_scheduler} does not sample --objective "
            f"{self.objective} models; use one of {', '.join(samplers)}",
        )
        require(self.sample_eta >= 0, f"--sample-eta must be >= 0, got {self.sample_eta}")
        require(
            self.sample_eta == 0 or self.sample_scheduler == "ddim",
            f"--sample-eta applies to --sample-scheduler ddim only, got {self.sample_scheduler}",
        )
        require(
            0 <= self.label_dropout < 1,
            f"--label-dropout must be in [0, 1), got {self.label_dropout}",
        )
        require(
            self.sample_guidance_scale >= 0,
            f"--sample-guidance-scale must be >= 0, got {self.sample_guidance_scale}",
        )

    def _check_edm(self) -> None:
        for name, value in {**SCHEDULE_DEFAULTS, "min_snr_gamma": None}.items():
            require(
                getattr(self, name) in (None, value),
                f"--{name.replace('_', '-')} applies to --objective ddpm only",
            )
        require(self.p_std > 0, f"--p-std must be > 0, got {self.p_std}")
        require(self.sigma_data > 0, f"--sigma-data must be > 0, got {self.sigma_data}")
        require(
            0 < self.sigma_min < self.sigma_max,
            f"--sigma-min and --sigma-max need 0 < min < max, got {self.sigma_min}, "
            f"{self.sigma_max}",
        )
        require(self.rho > 0, f"--rho must be > 0, got {self.rho}")


def take_schedule(cfg: DDPMConfig, scheduler_config: dict[str, Any], source: str) -> None:
    """Fill the schedule flags not given from a model's scheduler config."""
    given = {name: getattr(cfg, name) for name in SCHEDULE_DEFAULTS}
    for name, value in training_schedule(given, scheduler_config, source).items():
        setattr(cfg, name, value)


def initial_model(run: Run) -> nn.Module:
    """A new network of --preset, or --init-from's trained one (checked against the data; its
    noise schedule fills the schedule flags not given). A run that has checkpoints resumes:
    the network and schedule are then the checkpoint's and --init-from is not read."""
    cfg = run.cfg
    if cfg.init_from is None:
        return build_backbone(
            cfg.backbone, cfg.preset, cfg.resolution, cfg.channels, run.data.num_classes
        )
    if run.checkpoint is not None:
        state = run.checkpoint.state
        if cfg.objective == "ddpm":
            take_schedule(cfg, state.get("scheduler_config") or {}, str(run.checkpoint.path))
        logger.info("resuming %s: --init-from %s is not read", run.checkpoint.path, cfg.init_from)
        network_class = BACKBONE_CLASSES[state.get("model_class", "UNet2DModel")]
        return prepare_loaded(network_class.from_config(state["model_config"]))
    source = main_process_first(
        run.accelerator,
        lambda: resolve_model_source(cfg.init_from, "init_from"),
        InputError(f"{cfg.init_from} could not be found (the main process says why)", "init_from"),
    )
    try:
        loaded = load_for_sampling(source, "ema")
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"{cfg.init_from} cannot be loaded: {err}", "init_from") from err
    check_init_model(
        loaded,
        cfg.init_from,
        objective=cfg.objective,
        resolution=cfg.resolution,
        channels=cfg.channels,
        num_classes=run.data.num_classes,
    )
    backbone = backbone_of(loaded.model)
    if cfg.backbone not in (None, backbone):
        raise InputError(
            f"{cfg.init_from} is a {backbone} network: drop --backbone {cfg.backbone}", "backbone"
        )
    cfg.backbone = backbone
    if cfg.objective == "edm":
        sigma_data = (loaded.scheduler_config or {}).get("sigma_data", cfg.sigma_data)
        if sigma_data != cfg.sigma_data:
            raise InputError(
                f"{cfg.init_from} was trained with --sigma-data {sigma_data}: pass it",
                "init_from",
            )
    else:
        take_schedule(cfg, loaded.scheduler_config or {}, cfg.init_from)
    logger.info("starting from the weights of %s (%s)", cfg.init_from, source)
    # The same network as a fresh one would be (no loading metadata in its config), so the
    # checkpoints of this run describe it as resume rebuilds it.
    config = {k: v for k, v in loaded.model.config.items() if not k.startswith("_")}
    model = prepare_loaded(type(loaded.model).from_config(config))
    model.load_state_dict(loaded.model.state_dict())
    return model


def train(cfg: DDPMConfig) -> Run:
    run = start_run(cfg, with_labels=cfg.class_conditional)
    model = initial_model(run)
    if cfg.objective == "edm":
        scheduler = make_edm_scheduler(cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    else:
        scheduler = make_train_scheduler(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.prediction_type
        )
    method = kind_named(cfg.objective, "--objective").method(run, scheduler, backbone_of(model))
    loop.train(run, method, model)
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(DDPMConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
