"""What `sample.py` draws: its options, the sampler and classes they choose for a loaded model,
and the function that turns a range of sample indices into uint8 images.

Sample k comes from the seed (`--seed`, k) and has class cycle[k mod len(cycle)] (a
class-conditional model) or prompt k mod P (a text-to-image model): an image never depends on
the batch it is drawn in or on the number of processes. Nothing here needs Accelerate;
`sample.py` shards the work and writes the files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ddp_utils.checkpoint import STATE_FILE
from ddp_utils.compile import CompileBackend, CompileMode, check_compile_options
from ddp_utils.config import option, require
from ddp_utils.data.source import NATIVE_RESOLUTION
from ddp_utils.errors import InputError
from ddp_utils.images import to_uint8
from ddp_utils.lock import lock_holder
from ddp_utils.train_config import MixedPrecision
from diffusion.conditioning.classes import ClassLabels
from diffusion.conditioning.guidance import parse_guidance_interval
from diffusion.conditioning.text import (
    PromptCondition,
    encode_prompts,
    read_prompts_file,
    takes_attention_mask,
)
from diffusion.kinds import KINDS, SamplerChoice, choose_sampler, kind_named
from diffusion.kinds.registry import all_knobs, all_samplers, default_steps, knob_options
from diffusion.loading import LoadedModel, Weights
from diffusion.networks import sample_shape
from diffusion.sources import is_hub_id
from diffusion.text_encoders import load_as_recorded, text_encoder_changes

logger = logging.getLogger("ddp_diffusion.sample")

SamplerName = Literal[tuple(all_samplers())]  # type: ignore[valid-type]
# --eta, --churn, ...: every kind's samplers' knobs.
Knobs = knob_options("", "")


def _steps_help() -> str:
    defaults = [
        f"{kind.name} {default_steps(kind, None)}" for kind in KINDS.values() if not kind.samplers
    ]
    defaults += [f"{name} {sampler.default_steps}" for name, sampler in all_samplers().items()]
    return f"sampler steps (default: {', '.join(defaults)})"


@dataclass
class SampleConfig(Knobs):
    """Sampling from an export folder, a pipeline folder, a checkpoint or a run directory."""

    model_path: str = option(
        "",
        "export / pipeline / checkpoint-N / run directory (a LoRA fine-tune's: its adapter on "
        "its base), a diffusers DDPMPipeline, UNet2DModel or StableDiffusionPipeline folder, or "
        "a hub id (google/ddpm-cifar10-32)",
        positional=True,
    )
    output_dir: str = option("samples", "where samples.npz and grid.png are written")
    num_samples: int = option(64, "number of images")
    batch_size: int = option(64, "images per forward pass, per process")
    seed: int = option(0, "sample k is drawn from (seed, k)")
    num_steps: int | None = option(None, _steps_help(), aliases=("--num-inference-steps",))
    scheduler: SamplerName | None = option(
        None,
        "sampler (default: "
        + ", ".join(
            f"{k.default_sampler} for {k.name} models" for k in KINDS.values() if k.samplers
        )
        + "; basic models have their own)",
    )
    class_labels: str | None = option(
        None,
        "class-conditional models: 'all' (sample k gets class k mod C: every class evenly) or "
        "a comma list of class ids or names (sample k gets entry k mod n); default: all",
    )
    prompt: list[str] | None = option(
        None,
        "text-to-image models: the prompts (each value one prompt; repeat the flag or give "
        "several: --prompt 'a handwritten seven' 'the digit two'); sample k gets prompt k mod n; "
        "default: the prompts of the model's training grids",
    )
    prompts_file: str | None = option(
        None, "text-to-image models: a text file of prompts, one per line (as --prompt)"
    )
    text_encoder: str | None = option(
        None,
        "text-to-image models: where their text encoder is now, when the place their run "
        "recorded is gone (checked against the fingerprint it was trained with)",
    )
    negative_prompt: str | None = option(
        None,
        "text-to-image models: what guidance steers away from, in place of the empty prompt "
        "(with --guidance-scale > 1)",
    )
    guidance_scale: float | None = option(
        None,
        "class-conditional and text models: classifier-free guidance w (0: unconditional, 1: "
        "conditional, > 1: more like the class or prompt); default: the one the model was "
        "trained with",
    )
    guidance_interval: str | None = option(
        None,
        "class-conditional and text models: noise levels 'LOW,HIGH' (sigma in (LOW, HIGH]) "
        "where w > 1 applies, the conditional output elsewhere; 'all': every step; default: "
        "the model's",
    )
    per_class_fid: bool = option(
        False, "with --fid on a class-conditional model: FID/KID of each class too"
    )
    weights: Weights = option("ema", "EMA or raw weights (exports without raw weights: EMA)")
    vae: str | None = option(
        None,
        "a latent run's checkpoint: where its VAE is now, when the place it recorded is gone "
        "(checked against the hash of the weights it was trained with); exports hold theirs",
    )
    mixed_precision: MixedPrecision = option("no", "autocast dtype of the network")
    compile: bool = option(
        False,
        "torch.compile the denoiser: the network, guidance's batched pair and EDM's "
        "preconditioning in one graph (each batch size compiles once; inductor's cache)",
    )
    compile_backend: CompileBackend = option("inductor", "torch.compile backend")
    compile_mode: CompileMode = option(
        "default", "inductor's mode; default: fused kernels, reduce-overhead: and CUDA graphs"
    )
    save_images: bool = option(False, "also write one PNG per sample")
    save_progression: bool = option(False, "also write the denoising strip (progression.png)")
    grid_size: int = option(64, "images in grid.png")
    fid: bool = option(False, "score the samples with FID/KID against --dataset (fid.json)")
    dataset: str | None = option(
        None, "reference for --fid, as training's --dataset; at the model's size and channels"
    )
    dataset_config: str | None = option(None, "hub dataset config name (with --fid)")
    split: str = option("train", "reference split (with --fid)")
    max_reference: int | None = option(
        None, "use at most N dataset images as the --fid reference (none: all)"
    )
    clip_model: str | None = option(
        None,
        "text-to-image models: the CLIP score of the samples against their prompts "
        "(clip_score.json; torchmetrics' 100 * max(cos, 0), mean): a folder holding a "
        "transformers CLIPModel (safetensors) with its tokenizer and image processor, or a hub "
        "id such as openai/clip-vit-large-patch14",
    )

    def __post_init__(self) -> None:
        require(bool(self.model_path), "MODEL_PATH is required (an export, checkpoint or run dir)")
        require(
            Path(self.model_path).exists() or is_hub_id(self.model_path),
            f"MODEL_PATH {self.model_path} does not exist (and is not a hub id such as "
            "google/ddpm-cifar10-32)",
        )
        require(self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(
            self.num_steps is None or self.num_steps >= 1,
            f"--num-steps (--num-inference-steps) must be >= 1, got {self.num_steps}",
        )
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        for name, knob in all_knobs().items():  # ranges now; which sampler takes it, once loaded
            value = getattr(self, name)
            if value is not None:
                knob.check(value, f"--{name.replace('_', '-')}")
        require(
            self.compile or (self.compile_backend, self.compile_mode) == ("inductor", "default"),
            "--compile-mode and --compile-backend apply with --compile only: add --compile",
        )
        try:
            check_compile_options(self.compile_backend, self.compile_mode)
        except ValueError as err:
            raise InputError(str(err), "compile_mode") from None
        require(
            self.guidance_scale is None or self.guidance_scale >= 0,
            f"--guidance-scale must be >= 0, got {self.guidance_scale}",
        )
        if self.guidance_interval is not None:
            parse_guidance_interval(self.guidance_interval, "guidance_interval")
        require(not self.per_class_fid or self.fid, "--per-class-fid needs --fid")
        require(
            self.prompt is None or self.prompts_file is None,
            "--prompt and --prompts-file both give the prompts: keep one",
        )
        require(
            self.prompt is None or all(p.strip() for p in self.prompt),
            f"--prompt needs at least one prompt, none blank; got {self.prompt}",
        )
        if self.prompts_file is not None:
            read_prompts_file(self.prompts_file, "prompts_file")
        require(self.grid_size >= 1, "--grid-size must be >= 1")
        require(not self.fid or bool(self.dataset), "--fid needs --dataset (the reference images)")
        require(
            not self.fid or self.num_samples >= 2, "--fid needs --num-samples >= 2 (a covariance)"
        )
        require(
            self.max_reference is None or self.max_reference >= 2,
            f"--max-reference must be >= 2, got {self.max_reference}",
        )


DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sampler_choice(cfg: SampleConfig, loaded: LoadedModel) -> SamplerChoice:
    """The sampler for the loaded model: `--scheduler` or its kind's default, with its steps
    and knobs. A sampler of another kind is refused, and so are knobs the sampler does not
    have and more steps than the model allows."""
    kind = kind_named(loaded.task, loaded.source)
    knobs = {name: getattr(cfg, name) for name in all_knobs()}
    if not kind.samplers and cfg.weights != "ema":
        logger.info("--weights applies to pipeline exports and checkpoints; ignored")
    return choose_sampler(
        kind, cfg.scheduler, cfg.num_steps, knobs, source=loaded.source,
        scheduler_config=loaded.scheduler_config,
    )  # fmt: skip


def choose_condition(
    cfg: SampleConfig, loaded: LoadedModel, device: torch.device | str = "cpu"
) -> tuple[ClassLabels | PromptCondition | None, float]:
    """The samples' condition (sample k's class or prompt: `.labels([k])`) and the guidance
    scale: prompts for a text-to-image model, a class cycle for a class-conditional one, none
    (scale 1) for an unconditional one. Flags of another kind of model are refused."""
    text = loaded.text_encoder is not None
    prompt_flags = (
        cfg.prompt or cfg.prompts_file or cfg.negative_prompt is not None or cfg.text_encoder
    )
    if prompt_flags and not text:
        raise InputError(
            f"{loaded.source} is not a text-to-image model: it takes no prompts", "prompt"
        )
    if cfg.clip_model is not None and not text:
        raise InputError(
            f"{loaded.source} is not a text-to-image model: --clip-model scores images against "
            "their prompts; drop it (--fid scores any model)",
            "clip_model",
        )
    if text and (cfg.class_labels is not None or cfg.per_class_fid):
        raise InputError(
            f"{loaded.source} is a text-to-image model: it takes prompts (--prompt), not classes",
            "class_labels",
        )
    if text:
        guidance = loaded.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
        return prompt_condition(cfg, loaded, device), guidance
    cycle, guidance = choose_classes(cfg, loaded)
    if cycle is None:
        return None, guidance
    return ClassLabels(tuple(loaded.class_names or ()), cycle=tuple(cycle)), guidance


def prompt_condition(
    cfg: SampleConfig, loaded: LoadedModel, device: torch.device | str
) -> PromptCondition:
    """--prompt (or --prompts-file, else the model's training grids' prompts) and the negative
    prompt (default: the empty prompt) encoded once by the model's text encoder, then let go:
    --text-encoder's, else the export's own copy (`text_encoder/`, `tokenizer/`), else the one
    its run recorded; checked against the fingerprint it was trained with."""
    facts = loaded.text_encoder or {}
    if cfg.prompts_file is not None:
        prompts = read_prompts_file(cfg.prompts_file, "prompts_file")
    else:
        prompts = cfg.prompt or loaded.prompts
    if not prompts:
        raise InputError(f"{loaded.source} is a text-to-image model: give --prompt", "prompt")
    spec = cfg.text_encoder or loaded.text_encoder_folder or facts["source"]
    try:
        encoder = load_as_recorded(facts, spec)
    except InputError as err:
        raise InputError(
            f"{loaded.source} was trained on text encoded by {facts['source']}, and {spec} "
            f"cannot be loaded now: {err}; give sample.py --text-encoder with where that "
            "encoder is now",
            "text_encoder",
        ) from None
    changed = text_encoder_changes(facts, encoder)
    if changed:
        raise InputError(
            f"{loaded.source}: {changed[0]} (the text encoder changed since training)",
            "text_encoder",
        )
    encoder.to(device)
    condition = PromptCondition(
        encode_prompts(encoder, prompts),
        encode_prompts(encoder, [cfg.negative_prompt or ""]),
        takes_attention_mask(facts),
    )
    encoder.to("cpu")
    return condition


def choose_classes(cfg: SampleConfig, loaded: LoadedModel) -> tuple[list[int] | None, float]:
    """(the class cycle sample k takes entry k mod n of, the guidance scale); (None, 1) for
    an unconditional model."""
    if not loaded.num_classes:
        if (
            cfg.class_labels is not None
            or cfg.guidance_scale is not None
            or cfg.guidance_interval is not None
            or cfg.per_class_fid
        ):
            raise InputError(
                f"{loaded.source} is not class-conditional: it takes no classes or guidance",
                "class_labels",
            )
        return None, 1.0
    names = loaded.class_names or []
    if cfg.class_labels in (None, "all"):
        cycle = list(range(len(names)))
    else:
        cycle = []
        for entry in (e.strip() for e in cfg.class_labels.split(",")):
            if entry in names:
                cycle.append(names.index(entry))
            elif entry.isdigit() and int(entry) < len(names):
                cycle.append(int(entry))
            else:
                raise InputError(
                    f"{entry!r} is not a class of this model; its classes: {', '.join(names)}",
                    "class_labels",
                )
    guidance = loaded.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    return cycle, guidance


def guidance_interval(cfg: SampleConfig, loaded: LoadedModel) -> tuple[float, float] | None:
    """The noise levels where w > 1 applies: --guidance-interval, else the model's."""
    if cfg.guidance_interval is None:
        return loaded.guidance_interval
    return parse_guidance_interval(cfg.guidance_interval, "guidance_interval")


def make_chunk_fn(
    cfg: SampleConfig,
    loaded: LoadedModel,
    device: torch.device,
    choice: SamplerChoice,
    source: ClassLabels | PromptCondition | None = None,
    guidance: float = 1.0,
) -> tuple[Callable[[range], torch.Tensor], list[torch.Tensor], list[int]]:
    """(items -> uint8 NHWC samples, the progression filled by the chunk of item 0, the
    indices of samples that came out non-finite). With a condition `source` (`choose_condition`),
    sample k has its class or prompt k and is guided with scale `guidance`."""
    draw = kind_named(loaded.task, loaded.source).sampler(
        loaded.model,
        loaded.scheduler_config,
        choice,
        seed=cfg.seed,
        shape=sample_shape(loaded.model, loaded.resolution),
        device=device,
        dtype=DTYPES[cfg.mixed_precision],
        null=None if source is None else source.null,
        guidance_scale=guidance,
        guidance_interval=guidance_interval(cfg, loaded),
        compile=(cfg.compile_backend, cfg.compile_mode) if cfg.compile else None,
        codec=loaded.codec,  # a latent model's draw decodes its latents
    )
    progression: list[torch.Tensor] = []  # x_t of the first 8 samples, every 1/10 of the steps
    nonfinite: list[int] = []

    def chunk(indices: range) -> torch.Tensor:
        every = math.ceil(choice.steps / 10) if cfg.save_progression and 0 in indices else None
        condition = None if source is None else source.for_samples(indices, device)
        x, snapshots = draw(indices, condition, every)
        progression.extend(s[:8] for s in snapshots)
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        nonfinite.extend(k for k, ok in zip(indices, finite.tolist()) if not ok)
        return torch.from_numpy(to_uint8(x, loaded.value_range))

    return chunk, progression, nonfinite


def count_calls(model: torch.nn.Module) -> list[int]:
    """A one-element list counting the images the model's forward calls see: its network
    evaluations (guidance's batched pair counts two per image)."""
    calls = [0]

    @torch.compiler.disable  # traced, the count would be a constant of the compiled graph
    def count(module: torch.nn.Module, args: tuple) -> None:
        calls[0] += len(args[0])

    model.register_forward_pre_hook(count)
    return calls


def describe_source(cfg: SampleConfig, loaded: LoadedModel) -> None:
    """Say what is sampled: which checkpoint, and whether its run is still training (its lock
    is held) or has no export yet, so a grid from a half-trained model is not taken for the
    final one."""
    source = loaded.source
    is_checkpoint = (source / STATE_FILE).is_file()
    what = f"{source} (a checkpoint: {source.name})" if is_checkpoint else str(source)
    logger.info("sampling %s with the %s weights", what, cfg.weights)
    given = Path(cfg.model_path)
    run_dirs = [
        d for d in (given, source.parent, source.parent.parent) if (d / "checkpoints").is_dir()
    ]
    if not run_dirs:
        return
    run_dir = run_dirs[0]
    holder = lock_holder(run_dir)
    if holder is not None:
        logger.warning(
            "%s is still being trained (%s): these samples come from %s, not from the model "
            "its training will end with",
            run_dir,
            holder,
            source.name,
        )
    elif is_checkpoint and given == run_dir:
        logger.warning(
            "%s has no export (its training has not finished, or stopped early): sampling its "
            "newest intact checkpoint, %s; run its training command again to finish it",
            run_dir,
            source.name,
        )


def warn_if_resized(cfg: SampleConfig, loaded: LoadedModel) -> None:
    """--fid's reference is --dataset at the samples' size: say when that means resizing."""
    native = NATIVE_RESOLUTION.get(cfg.dataset or "")
    if native is not None and native != loaded.resolution:
        logger.warning(
            "--dataset %s has %dx%d images and the samples are %dx%d: its images are resized "
            "to %dx%d for FID (right if the model was trained at that size from them; else "
            "give the dataset it was trained on)",
            cfg.dataset, native, native, loaded.resolution, loaded.resolution,
            loaded.resolution, loaded.resolution,
        )  # fmt: skip
