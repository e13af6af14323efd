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

from dataclasses import dataclass
from typing import Literal

from ddp_utils import loop
from ddp_utils.cli import cli_main
from ddp_utils.config import option, parse_config, require
from ddp_utils.run import Run, start_run
from ddp_utils.train_config import TrainConfig
from diffusion.conditioning import ConditioningOptions
from diffusion.ddpm import SCHEDULE_DEFAULTS
from diffusion.kinds import kind_named
from diffusion.kinds.ddpm import DDPMOptions
from diffusion.kinds.edm import EDMOptions
from diffusion.networks import (
    DEFAULT_PRESETS,
    Backbone,
    backbone_of,
    check_preset,
    preset_backbone,
)
from diffusion.pretrained import initial_network, resolve_sigma_data, run_codec
from diffusion.sampling import (
    DEFAULT_DDIM_ETA,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLERS_BY_TASK,
    SamplerName,
)
from evaluation.during_training import training_evaluator

Objective = Literal["ddpm", "edm"]
LatentScale = Literal["config", "measure"]


@dataclass
class DDPMConfig(ConditioningOptions, EDMOptions, DDPMOptions, TrainConfig):
    """DDPM or EDM training; defaults make readable digits in ~12 minutes on a 2-core CPU. Each
    objective's own options are its kind's section (diffusion/kinds/), as is class
    conditioning's (diffusion/conditioning.py)."""

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
    vae: str | None = option(
        None,
        "train on latents: a diffusers AutoencoderKL (a folder it wrote, train_autoencoder.py's "
        "export, a pipeline's vae/, or a hub id, as --init-from) encodes the data once (cached); "
        "the network denoises its latents and samples are decoded; frozen, in the run's "
        "precision; its config's scaling_factor, else one measured on the data",
    )
    latent_scale: LatentScale = option(
        "config",
        "with --vae, what latents are multiplied by: config: the VAE config's scaling_factor "
        "(measured when it has none); measure: 1 / their standard deviation over the data "
        "(for a VAE whose config holds another VAE's number, e.g. diffusers' 0.18215)",
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
    # --init-from (a resumed run reads its checkpoint, not that model); --vae's path, whose
    # weights are compared instead (diffusion.pretrained.run_codec).
    may_change_on_resume = TrainConfig.may_change_on_resume | {
        "sample_scheduler", "sample_eta", "sample_guidance_scale", "sample_guidance_interval",
        "init_from", "vae",
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
            for name, value in {**SCHEDULE_DEFAULTS, "min_snr_gamma": None}.items():
                require(
                    getattr(self, name) in (None, value),
                    f"--{name.replace('_', '-')} applies to --objective ddpm only",
                )
            self.check_edm_options()
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
        self.check_ddpm_options()
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
        self.check_conditioning_options()
        require(
            self.vae is not None or self.latent_scale == "config",
            "--latent-scale applies to latent models only: add --vae",
        )


def train(cfg: DDPMConfig) -> Run:
    run = start_run(cfg, with_labels=cfg.class_conditional)
    codec = run_codec(run)  # --vae: checked, the data encoded (or read from its cache)
    model = initial_network(run, codec)
    resolve_sigma_data(run, codec)  # EDM: the data's standard deviation, pixels or latents
    cfg.freeze()
    kind = kind_named(cfg.objective, "--objective")
    scheduler = kind.train_scheduler(cfg)
    if codec is not None and "clip_sample" in scheduler.config:
        # Latents are not in [-1, 1]; from_config (not register_to_config) so that a sampler
        # made from the export's config (DDIMScheduler.from_config) inherits it too.
        scheduler = type(scheduler).from_config(scheduler.config, clip_sample=False)
    method = kind.method(run, scheduler, backbone_of(model), codec)
    loop.train(run, method, model, evaluator=training_evaluator(run))
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(DDPMConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
