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

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    EDMEulerScheduler,
    UNet2DModel,
)
from torch import nn

from ddp_utils import loop
from ddp_utils.cli import cli_main
from ddp_utils.config import option, parse_config, require
from ddp_utils.data import Batch, to_float
from ddp_utils.distributed import main_process_first
from ddp_utils.errors import InputError
from ddp_utils.files import write_json
from ddp_utils.images import make_grid, rows_by_label, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from ddp_utils.run import Run, start_run
from ddp_utils.train_config import TrainConfig
from diffusion import pipeline_code
from diffusion.conditioning import Conditioning
from diffusion.ddpm import (
    SCHEDULE_DEFAULTS,
    VALUE_RANGE,
    BetaSchedule,
    NoiseTables,
    PredictionType,
    diffusion_loss,
    make_train_scheduler,
)
from diffusion.edm import edm_loss, make_edm_scheduler, sample_edm, sample_noise_levels
from diffusion.loading import load_for_sampling
from diffusion.models import build_ddpm_unet, check_ddpm_preset
from diffusion.pipeline_code.ddpm_pipeline import GuidedDDPMPipeline
from diffusion.pipeline_code.edm_pipeline import EDMPipeline
from diffusion.pretrained import check_init_model, resolve_model_source, training_schedule
from diffusion.sampling import (
    DEFAULT_DDIM_ETA,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLERS_BY_TASK,
    SamplerName,
    make_inference_scheduler,
    sample_ddpm,
)
from evaluation.during_training import training_evaluator

logger = logging.getLogger("ddp_diffusion")
TARGETS = {  # what a DDPM network is trained to predict, in words
    "epsilon": "the noise (epsilon)",
    "v_prediction": "the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0",
    "sample": "the clean image",
}
Objective = Literal["ddpm", "edm"]
DEFAULT_PRESET = "digits-small"
NUM_LOSS_BINS = 4  # the loss is also logged per quarter of the noise levels: loss_t_q0..3


@dataclass
class DDPMConfig(TrainConfig):
    """DDPM or EDM training; defaults make readable digits in ~12 minutes on a 2-core CPU."""

    objective: Objective = option(
        "ddpm",
        "ddpm: predict the noise of T discrete timesteps (Ho et al. 2020); edm: the "
        "preconditioned denoiser on log-normal noise levels (Karras et al. 2022)",
    )
    preset: str | None = option(
        None,
        f"UNet preset (digits-small, unet-4.7m, unet-18.5m, ddpm-cifar10) or a JSON config "
        f"file; default: {DEFAULT_PRESET} (none with --init-from: the network is its)",
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
            self.preset = self.preset or DEFAULT_PRESET
            check_ddpm_preset(self.preset, self.resolution)  # a bad one stops --dry-run too
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


def report_by_bin(
    stats: MetricWindow, prefix: str, bins: torch.Tensor, per_sample: torch.Tensor
) -> None:
    """Report the mean of `per_sample` within each of NUM_LOSS_BINS bins as `<prefix>0..3`."""
    zeros = torch.zeros(NUM_LOSS_BINS, device=per_sample.device)
    sums = zeros.index_add(0, bins, per_sample)
    counts = zeros.index_add(0, bins, torch.ones_like(per_sample))
    for q in range(NUM_LOSS_BINS):
        stats.add(f"{prefix}{q}", sums[q], counts[q])


def denoising_strip(snapshots: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Rows: the sampler's x every 1/10 of the steps; columns: the grid's first samples."""
    grid = make_grid(to_uint8(torch.cat(snapshots), VALUE_RANGE), nrow=len(snapshots[0]))
    return {"denoising": grid}


def network_fact(cfg: DDPMConfig) -> tuple[str, str]:
    return ("network", f"UNet2DModel, fine-tuned from {cfg.init_from}" if cfg.init_from
            else f"UNet2DModel, preset {cfg.preset}")  # fmt: skip


def classes_facts(conditioning: Conditioning) -> list[tuple[str, str]]:
    if not conditioning.num_classes:
        return []
    return [
        ("classes", ", ".join(conditioning.class_names)),
        ("guidance", f"classifier-free, label dropout {conditioning.label_dropout}, default "
                     f"scale {conditioning.guidance_scale}"),
    ]  # fmt: skip


def remote_code_lines(folder_hint: str, call: str) -> str:
    return (
        "from diffusers import DiffusionPipeline\n"
        f'pipeline = DiffusionPipeline.from_pretrained("{folder_hint}", trust_remote_code=True, '
        "use_safetensors=True)  # runs this folder's pipeline.py\n"
        f"images = pipeline({call}).images  # PIL images"
    )


class UNetMethod:
    """What the DDPM and EDM methods share: a UNet in [-1, 1], exported as a pipeline folder,
    optionally class-conditional (grids one class per row, guided samples)."""

    value_range = VALUE_RANGE
    export_name = "pipeline"

    def __init__(self, run: Run, scheduler: DDPMScheduler | EDMEulerScheduler) -> None:
        self.run, self.cfg, self.scheduler = run, run.cfg, scheduler
        self.device = run.accelerator.device
        cfg = run.cfg
        if cfg.class_conditional:
            names = tuple(run.data.class_names or ())
            self.conditioning = Conditioning(names, cfg.label_dropout, cfg.sample_guidance_scale)
        else:
            self.conditioning = Conditioning()

    def task_info(self) -> dict[str, Any]:
        """The task, value range and scheduler, and what sample.py needs of the classes."""
        info = {
            "task": self.cfg.objective,
            "value_range": list(VALUE_RANGE),
            "scheduler_config": dict(self.scheduler.config),
        }
        if self.conditioning.num_classes:
            info["class_names"] = list(self.conditioning.class_names)
            info["guidance_scale"] = self.conditioning.guidance_scale
        return info

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """Unconditional: 8 per row. Class-conditional: one class per row (sample k: class k
        mod C)."""
        conditioning = self.conditioning
        if not conditioning.num_classes:
            return images, 8
        labels = conditioning.sample_labels(range(len(images)))
        return rows_by_label(images, labels.tolist(), conditioning.num_classes)

    def _sample(
        self, net: nn.Module, indices: range, every: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Samples `indices` of the run's seeds with the grids' sampler (and the x's every
        `every` steps)."""
        raise NotImplementedError

    def sample(self, net: nn.Module, indices: range) -> torch.Tensor:
        return self._sample(net, indices)[0]


class DDPMMethod(UNetMethod):
    """Ho et al. 2020: regress the noise (or x0, or v) added at a random timestep."""

    def __init__(self, run: Run, scheduler: DDPMScheduler) -> None:
        super().__init__(run, scheduler)
        self.sampler = make_inference_scheduler(self.cfg.sample_scheduler, scheduler.config)
        # Every per-timestep table on the device now: a step copies nothing from the host.
        self.tables = NoiseTables.build(scheduler, self.device)

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        # Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), regress the target at x_t.
        x0, num_timesteps = batch.images, self.cfg.num_train_timesteps
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        labels = self.conditioning.training_labels(batch.labels, generator)
        loss, per_sample = diffusion_loss(
            model, self.tables, x0, t, noise, self.cfg.min_snr_gamma, labels
        )
        report_by_bin(stats, "loss_t_q", t * NUM_LOSS_BINS // num_timesteps, per_sample)
        return loss

    def _sample(
        self, net: nn.Module, indices: range, every: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.cfg
        return sample_ddpm(
            net,
            self.sampler,
            indices,
            cfg.seed,
            cfg.sample_steps,
            cfg.sample_eta,
            self.device,
            progression_every=every,
            class_labels=self.conditioning.sample_labels(indices),
            guidance_scale=self.conditioning.guidance_scale,
        )

    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """The denoising strip: x_t of the grid's first 8 samples, every 1/10 of the steps."""
        indices = range(min(8, self.cfg.num_sample_images))
        self.sampler.set_timesteps(self.cfg.sample_steps)  # Heun: 2N - 1 network evaluations
        every = math.ceil(len(self.sampler.timesteps) / 10)
        return denoising_strip(self._sample(net, indices, every)[1])

    @torch.no_grad()
    def data_pictures(self) -> dict[str, np.ndarray]:
        """A real batch noised at timesteps spread over 0..T-1."""
        x0 = to_float(self.run.data.images[:8].to(self.device), VALUE_RANGE, None)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        rows = []
        for t in torch.linspace(0, self.cfg.num_train_timesteps - 1, 8).long():
            noise = torch.randn(x0.shape, generator=generator, device=self.device)
            rows.append(self.scheduler.add_noise(x0, noise, t.repeat(len(x0)).to(self.device)))
        return {"forward_noising": make_grid(to_uint8(torch.cat(rows), VALUE_RANGE), nrow=len(x0))}

    def card(self) -> CardFacts:
        cfg, conditioning = self.cfg, self.conditioning
        kind = "class-conditional DDPM" if conditioning.num_classes else "DDPM"
        eta = f", eta {cfg.sample_eta:g}" if cfg.sample_scheduler == "ddim" else ""
        if conditioning.num_classes:
            load = remote_code_lines(
                "path/to/this/folder", "class_labels=[0, 1, 2], guidance_scale=1.5"
            )
        else:
            load = (
                "from diffusers import DDPMPipeline\n"
                'pipeline = DDPMPipeline.from_pretrained("path/to/this/folder", '
                "use_safetensors=True)\n"
                "images = pipeline(batch_size=16, num_inference_steps=1000).images  # PIL images"
            )
        return CardFacts(
            title=f"{kind} on {cfg.dataset}",
            summary=(
                f"A denoising diffusion model (Ho et al. 2020) generating {cfg.resolution}x"
                f"{cfg.resolution} images like those of {cfg.dataset}: a UNet2DModel trained to "
                f"predict {TARGETS[cfg.prediction_type]} at one of {cfg.num_train_timesteps} noise "
                f"levels of the {cfg.beta_schedule} schedule."
            ),
            script="ddpm",
            sampler=(
                f"`{cfg.sample_scheduler}` with {cfg.sample_steps} steps{eta} made the grid "
                "above (`python sample.py <folder> --scheduler ...` lists the others); "
                "diffusers' DDPMScheduler with 1000 steps is the slow reference."
            ),
            how_to_load=load,
            facts=[
                (
                    "objective",
                    f"DDPM, {cfg.prediction_type} prediction, {cfg.beta_schedule} "
                    f"schedule, T = {cfg.num_train_timesteps}",
                ),
                network_fact(cfg),
                *classes_facts(conditioning),
            ],  # fmt: skip
            tags=["ddpm", "class-conditional"] if conditioning.num_classes else ["ddpm"],
            class_conditional=bool(conditioning.num_classes),
        )

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A diffusers DDPMPipeline folder (EMA weights), or for a class-conditional model a
        GuidedDDPMPipeline with its `pipeline.py`; the raw weights in `unet_raw/`."""
        conditioning = self.conditioning
        if conditioning.num_classes:
            pipeline = GuidedDDPMPipeline(
                net, self.scheduler, list(conditioning.class_names), conditioning.guidance_scale
            )
            ship_pipeline(pipeline, folder, DDPM_PIPELINE_FILE, "GuidedDDPMPipeline")
        else:
            DDPMPipeline(unet=net, scheduler=self.scheduler).save_pretrained(
                folder, safe_serialization=True
            )
        raw.save_pretrained(folder / "unet_raw", safe_serialization=True)


PIPELINE_FILE = Path(pipeline_code.__file__).with_name("edm_pipeline.py")
DDPM_PIPELINE_FILE = Path(pipeline_code.__file__).with_name("ddpm_pipeline.py")


def ship_pipeline(pipeline: DiffusionPipeline, folder: Path, code: Path, class_name: str) -> None:
    """save_pretrained, plus the pipeline's own code as `pipeline.py`: diffusers looks
    `_class_name` up in its own module unless it names a file beside it (and then needs
    `trust_remote_code=True` to run it)."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    write_json(folder / "model_index.json", {**index, "_class_name": ["pipeline", class_name]})
    shutil.copyfile(code, folder / "pipeline.py")


class EDMMethod(UNetMethod):
    """Karras et al. 2022: the preconditioned denoiser D(x; sigma) around the same UNet."""

    def task_info(self) -> dict[str, Any]:
        cfg = self.cfg
        distribution = {"p_mean": cfg.p_mean, "p_std": cfg.p_std}
        return {**super().task_info(), "noise_level_distribution": distribution}

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        # Table 1 (training): ln(sigma) ~ N(P_mean, P_std^2), n ~ N(0, I), x = y + sigma n.
        y, cfg = batch.images, self.cfg
        noise = torch.randn(y.shape, generator=generator, device=y.device)
        sigma = sample_noise_levels(len(y), cfg.p_mean, cfg.p_std, generator)
        labels = self.conditioning.training_labels(batch.labels, generator)
        loss, per_sample = edm_loss(model, y, sigma, noise, cfg.sigma_data, labels)
        # Quarters of the training distribution: z = (ln sigma - P_mean) / P_std vs N(0, 1)'s.
        z = (sigma.log() - cfg.p_mean) / cfg.p_std
        bins = (z > -0.6745).long() + (z > 0).long() + (z > 0.6745).long()
        report_by_bin(stats, "loss_sigma_q", bins, per_sample)
        return loss

    def _sample(
        self, net: nn.Module, indices: range, every: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.cfg
        return sample_edm(
            net,
            self.scheduler.config,
            indices,
            cfg.seed,
            cfg.sample_steps,
            second_order=cfg.sample_scheduler == "edm-heun",
            device=self.device,
            progression_every=every,
            class_labels=self.conditioning.sample_labels(indices),
            guidance_scale=self.conditioning.guidance_scale,
        )

    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """The denoising strip: x_i / sqrt(1 + sigma_i^2) of the grid's first 8 samples."""
        indices = range(min(8, self.cfg.num_sample_images))
        every = math.ceil(self.cfg.sample_steps / 10)  # at most 10 rows
        return denoising_strip(self._sample(net, indices, every)[1])

    @torch.no_grad()
    def data_pictures(self) -> dict[str, np.ndarray]:
        """A real batch at 8 noise levels from sigma_min to sigma_max, as y_sigma / sqrt(1 +
        sigma^2) (the variance-preserving scale of the DDPM strip)."""
        cfg = self.cfg
        y = to_float(self.run.data.images[:8].to(self.device), VALUE_RANGE, None)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        rows = []
        for sigma in np.geomspace(cfg.sigma_min, cfg.sigma_max, 8):
            noise = torch.randn(y.shape, generator=generator, device=self.device)
            rows.append((y + sigma * noise) / math.sqrt(1 + sigma**2))
        return {"forward_noising": make_grid(to_uint8(torch.cat(rows), VALUE_RANGE), nrow=len(y))}

    def card(self) -> CardFacts:
        cfg, conditioning = self.cfg, self.conditioning
        kind = "class-conditional EDM" if conditioning.num_classes else "EDM"
        call = "batch_size=16, num_inference_steps=18"
        if conditioning.num_classes:
            call = "class_labels=[0, 1, 2], guidance_scale=1.5, num_inference_steps=18"
        second = " (Heun: 2 network evaluations per step but the last)"
        return CardFacts(
            title=f"{kind} on {cfg.dataset}",
            summary=(
                f"A diffusion model generating {cfg.resolution}x{cfg.resolution} images like "
                f"those of {cfg.dataset}, trained as Karras et al. 2022 (EDM): a UNet2DModel "
                "inside the preconditioned denoiser D(x; sigma), noise levels ln(sigma) ~ "
                f"N({cfg.p_mean}, {cfg.p_std}^2), sigma_data {cfg.sigma_data}."
            ),
            script="ddpm",
            sampler=(
                f"`{cfg.sample_scheduler}` with {cfg.sample_steps} noise levels from sigma "
                f"{cfg.sigma_max:g} to {cfg.sigma_min:g} (rho {cfg.rho:g})"
                + (second if cfg.sample_scheduler == "edm-heun" else "")
                + " made the grid above; `churn=` > 0 makes it stochastic."
            ),
            how_to_load=remote_code_lines("path/to/this/folder", call),
            facts=[
                (
                    "objective",
                    f"EDM, sigma_data {cfg.sigma_data}, P_mean {cfg.p_mean}, P_std {cfg.p_std}",
                ),
                network_fact(cfg),
                *classes_facts(conditioning),
            ],  # fmt: skip
            tags=["edm", "class-conditional"] if conditioning.num_classes else ["edm"],
            class_conditional=bool(conditioning.num_classes),
        )

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A pipeline folder diffusers runs with `trust_remote_code=True`: the EMA UNet, the
        scheduler holding the EDM constants, `pipeline.py` (the EDMPipeline class), and the
        raw weights in `unet_raw/`."""
        conditioning = self.conditioning
        pipeline = EDMPipeline(
            net,
            self.scheduler,
            list(conditioning.class_names) or None,
            conditioning.guidance_scale if conditioning.num_classes else 1.0,
        )
        ship_pipeline(pipeline, folder, PIPELINE_FILE, "EDMPipeline")
        raw.save_pretrained(folder / "unet_raw", safe_serialization=True)


def take_schedule(cfg: DDPMConfig, scheduler_config: dict[str, Any], source: str) -> None:
    """Fill the schedule flags not given from a model's scheduler config."""
    given = {name: getattr(cfg, name) for name in SCHEDULE_DEFAULTS}
    for name, value in training_schedule(given, scheduler_config, source).items():
        setattr(cfg, name, value)


def initial_model(run: Run) -> UNet2DModel:
    """A new network of --preset, or --init-from's trained one (checked against the data; its
    noise schedule fills the schedule flags not given). A run that has checkpoints resumes:
    the network and schedule are then the checkpoint's and --init-from is not read."""
    cfg = run.cfg
    if cfg.init_from is None:
        return build_ddpm_unet(cfg.preset, cfg.resolution, cfg.channels, run.data.num_classes)
    if run.checkpoint is not None:
        state = run.checkpoint.state
        if cfg.objective == "ddpm":
            take_schedule(cfg, state.get("scheduler_config") or {}, str(run.checkpoint.path))
        logger.info("resuming %s: --init-from %s is not read", run.checkpoint.path, cfg.init_from)
        return UNet2DModel.from_config(state["model_config"])
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
    model = UNet2DModel.from_config(config)
    model.load_state_dict(loaded.model.state_dict())
    return model


def train(cfg: DDPMConfig) -> Run:
    run = start_run(cfg, with_labels=cfg.class_conditional)
    model = initial_model(run)
    if cfg.objective == "edm":
        scheduler = make_edm_scheduler(cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        method: DDPMMethod | EDMMethod = EDMMethod(run, scheduler)
    else:
        ddpm_scheduler = make_train_scheduler(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.prediction_type
        )
        method = DDPMMethod(run, ddpm_scheduler)
    loop.train(run, method, model, evaluator=training_evaluator(run))
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(DDPMConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
