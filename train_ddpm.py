r"""Train a diffusion model of any kind in diffusion/kinds/ (`--objective`): DDPM (v- or noise
prediction over 1000 timesteps), EDM (Karras et al. 2022's preconditioned denoiser) or rectified
flow (a velocity along the straight path from image to noise), with EMA, sample grids and an
export diffusers loads.

    # built-in digits on a CPU (the README's main job, ~11 minutes on 2 cores):
    python train_ddpm.py
    # the same data and budget with the EDM objective (Heun sampler, 18 steps):
    python train_ddpm.py --objective edm --output-dir runs/edm
    # rectified flow (Euler over diffusers' flow-matching schedule, 50 steps):
    python train_ddpm.py --objective flow --output-dir runs/flow
    # text to image: the captioned digits, the built-in tiny-clip encoder, a UNet that attends
    # to the text (--backbone pixart: PixArt-alpha's transformer):
    python train_ddpm.py --dataset digits-captioned --text-encoder tiny-clip \
        --output-dir runs/text --validation-prompts "a handwritten seven" "the digit two"
    # CIFAR-10 on N GPUs in bf16 (edit the config for your machine):
    accelerate launch --config_file accelerate_configs/1node_8gpu_bf16.yaml train_ddpm.py \
        --dataset cifar10 --preset unet-18.5m --random-flip --mixed-precision bf16 \
        --batch-size 32 --max-steps 200000 --output-dir runs/cifar10-unet-18.5m
    # sample from the exported pipeline (diffusers' DDPMPipeline/DDIMPipeline load it too;
    # an EDM export: DiffusionPipeline.from_pretrained(path, trust_remote_code=True,
    #     use_safetensors=True)):
    python sample.py runs/ddpm/pipeline --scheduler ddim --num-inference-steps 50
    python sample.py runs/edm/pipeline
    python sample.py runs/flow/pipeline --scheduler heun --num-steps 10
    python sample.py runs/text --prompt "a handwritten seven" --guidance-scale 3

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
from diffusion.adapters import AdapterOptions
from diffusion.class_images import run_class_images
from diffusion.conditioning.guidance import ConditioningOptions
from diffusion.conditioning.text import TextOptions
from diffusion.dreambooth import DreamBoothOptions
from diffusion.kinds import choose_sampler, kind_named, kinds_trained_by
from diffusion.kinds.registry import DEFAULT_OBJECTIVE, all_knobs, all_samplers, knob_options
from diffusion.networks import (
    BACKBONES,
    BackboneName,
    backbone_of,
    check_preset,
    preset_backbone,
    takes_text,
    text_backbones,
)
from diffusion.pipelines import supported, text_pipeline_family
from diffusion.pretrained import initial_network, resolve_kind_options, run_codec, run_text
from evaluation.during_training import run_clip_scorer, training_evaluator

KINDS = kinds_trained_by("train_ddpm.py")
Objective = Literal[tuple(kind.name for kind in KINDS)]  # type: ignore[valid-type]
SamplerName = Literal[tuple(all_samplers())]  # type: ignore[valid-type]
LatentScale = Literal["config", "measure"]
# The sampler knobs of the grids (--sample-eta, --sample-churn, ...): every kind's samplers'.
SampleKnobs = knob_options("sample_", "of the grids and --eval-every")


@dataclass
class DDPMConfig(
    DreamBoothOptions,
    AdapterOptions,
    TextOptions,
    ConditioningOptions,
    SampleKnobs,
    *(kind.options for kind in reversed(KINDS) if kind.options is not None),
    TrainConfig,
):
    """DDPM, EDM or another kind of train_ddpm.py; defaults make readable digits in ~11 minutes
    on a 2-core CPU. Each kind's options are its section (diffusion/kinds/<name>/options.py),
    as are class conditioning's (diffusion/conditioning/guidance.py), text's
    (diffusion/conditioning/text.py), LoRA's (diffusion/adapters.py) and DreamBooth's
    (diffusion/dreambooth.py)."""

    objective: Objective = option(
        DEFAULT_OBJECTIVE,
        "what the network learns: " + "; ".join(f"{kind.name}: {kind.summary}" for kind in KINDS),
    )
    backbone: BackboneName | None = option(
        None,
        "the network: unet (UNet2DModel) or dit (a diffusion transformer, "
        "DiTTransformer2DModel); with --text-encoder, text-unet (UNet2DConditionModel, Stable "
        "Diffusion's) or pixart (PixArtTransformer2DModel, PixArt-alpha's): both attend to the "
        "text; default: what --preset implies, else unet (text-unet with --text-encoder; with "
        "--init-from: its network's)",
    )
    preset: str | None = option(
        None,
        "network preset: UNets digits-small, unet-4.7m, unet-18.5m, ddpm-cifar10; DiTs "
        "dit-digits, dit-s-2, dit-b-2, dit-l-2, dit-xl-2 (the DiT paper's sizes); text UNets "
        "digits-text, sd15 (Stable Diffusion 1.x's, for a 768-wide encoder); PixArt "
        "pixart-digits; or a JSON file of the network's arguments; default: "
        + ", ".join(
            f"{b.default_preset} ({b.name})" for b in BACKBONES.values() if b.default_preset
        )
        + ", none with --init-from (the network is its)",
    )
    init_from: str | None = option(
        None,
        "start from a trained model's weights (fine-tuning): an export of this toolkit, a "
        "diffusers DDPMPipeline or UNet2DModel folder, a checkpoint, or a hub id such as "
        "google/ddpm-cifar10-32; its size, channels and classes must match the data, and its "
        "noise schedule is used unless given here. Or a text-to-image pipeline (a folder or a "
        f"hub id) of {supported()}: its denoiser, VAE, text encoder and schedule, on captions. "
        "A run with checkpoints resumes instead",
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
        "sampler of the logged grids and --eval-every (sample.py's --scheduler); default: "
        + ", ".join(f"{kind.default_sampler} ({kind.name})" for kind in KINDS),
    )
    sample_steps: int | None = option(
        None, "sampler steps of the grids and --eval-every (default: the sampler's, as sample.py)"
    )
    sample_every: int = option(1000, "log a sample grid every N steps (0: only at the end)")

    # Also free on resume: how the grids are sampled and their prompts, the export's default
    # guidance, and --init-from (a resumed run reads its checkpoint, not that model); --vae's
    # and --text-encoder's paths, whose weights are compared instead
    # (diffusion.pretrained.run_codec, run_text).
    may_change_on_resume = TrainConfig.may_change_on_resume | {
        "sample_scheduler", "sample_guidance_scale", "sample_guidance_interval", "init_from",
        "vae", "text_encoder", "validation_prompts", "validation_prompts_file", "export_fused",
        "clip_model",
        *(f"sample_{name}" for name in all_knobs()),
    }  # fmt: skip

    def __post_init__(self) -> None:
        kind = kind_named(self.objective, "--objective")
        # The grids' sampler: checked against the kind, its steps and knobs filled.
        knobs = {name: getattr(self, f"sample_{name}") for name in all_knobs()}
        choice = choose_sampler(
            kind, self.sample_scheduler, self.sample_steps, knobs, source=f"--objective {kind.name}",
            flag=lambda name: f"--sample-{name.replace('_', '-')}",
            scheduler_flag="--sample-scheduler", steps_flag="--sample-steps",
        )  # fmt: skip
        self.sample_scheduler, self.sample_steps = choice.name, choice.steps
        for name, value in choice.knobs.items():
            setattr(self, f"sample_{name}", value)
        super().__post_init__()
        self.take_pipeline_components()
        for other in KINDS:
            if other is not kind:
                other.leave_unused(self)
        self.check_text_options()
        prompts = self.validation_prompt_texts()
        require(
            prompts is None or len(prompts) <= self.num_sample_images,
            f"{len(prompts or ())} validation prompts and --num-sample-images "
            f"{self.num_sample_images}: each prompt is a row of the grids; give at most "
            f"{self.num_sample_images} prompts, or more images",
        )
        text = self.text_encoder is not None
        if self.init_from is None:
            implied = None if self.preset is None else preset_backbone(self.preset)
            self.backbone = self.backbone or implied or ("text-unet" if text else "unet")
            self.preset = self.preset or BACKBONES[self.backbone].default_preset
            check_preset(self.backbone, self.preset, self.resolution)  # stops --dry-run too
            require(
                takes_text(self.backbone) == text,
                f"--text-encoder needs a backbone that attends to text: --backbone "
                f"{' or '.join(text_backbones())} (--backbone {self.backbone} takes none)"
                if text else
                f"--backbone {self.backbone} is conditioned on text: add --text-encoder (the "
                "captions' encoder), or choose unet or dit",
            )  # fmt: skip
        else:
            require(
                not text or self.pipeline is not None,
                "--init-from with --text-encoder: fine-tuning a text-to-image model of this "
                f"toolkit is not supported yet; --init-from a pipeline of {supported()} brings "
                "its own text encoder",
            )
            require(
                self.preset is None,
                "--preset and --init-from both choose the network: drop --preset (the "
                "network, its size and its weights come from --init-from)",
            )
        kind.check_options(self)
        self.check_conditioning_options()
        require(
            self.vae is not None or self.latent_scale == "config",
            "--latent-scale applies to latent models only: add --vae",
        )
        require(
            self.pipeline is None or self.latent_scale == "config",
            "--latent-scale measure and --init-from a pipeline: its denoiser was trained on "
            "latents at its VAE config's scale, which the fine-tune keeps; drop --latent-scale",
        )
        self.check_adapter_options(self.pipeline)
        self.check_dreambooth_options(self.pipeline)
        require(
            self.class_prompt is None or self.sharding == "none",
            f"prior preservation (--class-prompt) under --sharding {self.sharding} is not "
            "supported yet (the base draws the class images whole on each process, before "
            "sharding): drop --sharding, or --class-prompt",
        )

    @property
    def pipeline(self) -> str | None:
        """The family of --init-from's text-to-image pipeline (None: not one)."""
        return self._pipeline

    def take_pipeline_components(self) -> None:
        """--init-from a text-to-image pipeline: its VAE and text encoder(s) are the run's
        (--vae and --text-encoder name the pipeline; other ones are refused)."""
        family = None if self.init_from is None else text_pipeline_family(self.init_from)
        self._pipeline = None if family is None else family.name
        if family is None:
            return
        for name in ("vae", "text_encoder"):
            flag = f"--{name.replace('_', '-')}"
            require(
                getattr(self, name) in (None, self.init_from),
                f"{flag} {getattr(self, name)} and --init-from {self.init_from}: a "
                f"{family.title} pipeline brings its own {name.replace('_', ' ')}; drop {flag}",
            )
            setattr(self, name, self.init_from)


def train(cfg: DDPMConfig) -> Run:
    run = start_run(
        cfg, with_labels=cfg.class_conditional, with_captions=cfg.text_encoder is not None
    )
    kind = kind_named(cfg.objective, "--objective")
    clip = run_clip_scorer(run)  # --clip-model: loaded and checked before any encoding
    run_class_images(run)  # --class-prompt: drawn once by the base (or read), beside the data
    codec = run_codec(run)  # --vae: checked, the data encoded (or read from its cache)
    # --text-encoder: checked, the captions and the grids' prompts encoded once (or read)
    run_text(run, cfg.validation_prompt_texts())
    model = initial_network(run, kind, codec)
    resolve_kind_options(run, kind, codec)  # e.g. EDM's sigma_data: the data's, or the model's
    cfg.freeze()
    scheduler = kind.train_scheduler(cfg)
    if codec is not None and "clip_sample" in scheduler.config:
        # Latents are not in [-1, 1]; from_config (not register_to_config) so that a sampler
        # made from the export's config (DDIMScheduler.from_config) inherits it too.
        scheduler = type(scheduler).from_config(scheduler.config, clip_sample=False)
    method = kind.method(run, scheduler, backbone_of(model), codec)
    evaluator = training_evaluator(run, clip, method.sample_prompts)
    loop.train(run, method, model, evaluator=evaluator)
    return run


def main(argv: list[str] | None = None) -> None:
    train(parse_config(DDPMConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
