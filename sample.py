r"""Images from any model this toolkit trains: an export, a checkpoint, or a run directory.

    # the basic model (train_basic.py): its stepping sampler
    python sample.py runs/basic/model --num-samples 64 --num-steps 40 --output-dir out/basic
    # DDPM (train_ddpm.py): DDPM-1000, DDIM-50, DPM-Solver, UniPC, Karras samplers; EMA or raw
    python sample.py runs/ddpm/pipeline --scheduler ddim --num-inference-steps 50 \
        --num-samples 1000 --output-dir out/ddim50
    # EDM (train_ddpm.py --objective edm): Heun over 18 noise levels (35 network evaluations)
    python sample.py runs/edm/pipeline --scheduler edm-heun --num-steps 18 --output-dir out/edm
    # any number of processes: the work is split, and a seed gives the same images
    accelerate launch --config_file accelerate_configs/1node_8gpu_bf16.yaml sample.py \
        runs/ddpm/pipeline --num-samples 10000 --batch-size 250 --output-dir out/ddim50
    # ... and score them: FID/KID against the training data, printed and in fid.json
    python sample.py runs/ddpm/pipeline --num-samples 1000 --fid --dataset digits

Writes `<output-dir>/samples.npz` (uint8 (N, H, W, C) as `arr_0`, the format evaluation tools
read) and `<output-dir>/grid.png`; `--save-images` adds one PNG per sample and
`--save-progression` a strip of the denoising trajectory, `--fid --dataset D` FID/KID against
dataset D in `fid.json` (sharded like the sampling). Sample k always comes from the
seed (`--seed`, k), so the images do not depend on the batch size or number of processes.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while the libraries below load (~10 s): exit 130 quietly
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.checkpoint import STATE_FILE
from ddp_utils.cli import cli_main, setup_logging
from ddp_utils.compile import CompileBackend, CompileMode, check_compile_options
from ddp_utils.config import option, parse_config, require, save_config
from ddp_utils.data import load_image_data
from ddp_utils.data.source import NATIVE_RESOLUTION
from ddp_utils.distributed import (
    all_finite,
    local_chunks,
    main_process_first,
    map_sharded,
    new_accelerator,
    raise_together,
)
from ddp_utils.errors import InputError, NonFiniteError, OutputError
from ddp_utils.files import atomic_file, write_json
from ddp_utils.images import make_grid, rows_by_label, save_png, to_uint8, upscale
from ddp_utils.lock import lock_holder
from ddp_utils.tracking import MIN_PICTURE_SIDE
from ddp_utils.train_config import MixedPrecision
from diffusion.kinds import SamplerChoice, kind_named
from diffusion.loading import LoadedModel, Weights, load_for_sampling
from diffusion.networks import sample_shape
from diffusion.pretrained import is_hub_id, resolve_model_source
from diffusion.sampling import DEFAULT_DDIM_ETA, DEFAULT_SAMPLER, SamplerName
from evaluation import (
    FeatureStats,
    compute_feature_stats,
    dataset_stats,
    fid_kid,
    load_fid_inception,
    per_class_fid_kid,
)

logger = logging.getLogger("ddp_diffusion.sample")


@dataclass
class SampleConfig:
    """Sampling from an export folder, a pipeline folder, a checkpoint or a run directory."""

    model_path: str = option(
        "",
        "export / pipeline / checkpoint-N / run directory, a diffusers DDPMPipeline or "
        "UNet2DModel folder, or a hub id (google/ddpm-cifar10-32)",
        positional=True,
    )
    output_dir: str = option("samples", "where samples.npz and grid.png are written")
    num_samples: int = option(64, "number of images")
    batch_size: int = option(64, "images per forward pass, per process")
    seed: int = option(0, "sample k is drawn from (seed, k)")
    num_steps: int | None = option(
        None,
        "sampler steps (default: basic 40, ddpm 1000, ddim 50, edm-heun 18, heun-karras 10, "
        "edm-euler 35, the others 20)",
        aliases=("--num-inference-steps",),
    )
    scheduler: SamplerName | None = option(
        None,
        f"sampler (default: {DEFAULT_SAMPLER['ddpm']} for DDPM models, "
        f"{DEFAULT_SAMPLER['edm']} for EDM models; basic models have their own)",
    )
    eta: float | None = option(
        None, f"DDIM noise scale (default: {DEFAULT_DDIM_ETA}, DDPM-like; 0: deterministic DDIM)"
    )
    churn: float = option(
        0.0, "EDM samplers: stochasticity S_churn (Karras et al. 2022; 0: deterministic)"
    )
    class_labels: str | None = option(
        None,
        "class-conditional models: 'all' (sample k gets class k mod C: every class evenly) or "
        "a comma list of class ids or names (sample k gets entry k mod n); default: all",
    )
    guidance_scale: float | None = option(
        None,
        "class-conditional models: classifier-free guidance w (0: unconditional, 1: "
        "conditional, > 1: more like the class); default: the one the model was exported with",
    )
    per_class_fid: bool = option(
        False, "with --fid on a class-conditional model: FID/KID of each class too"
    )
    weights: Weights = option("ema", "EMA or raw weights (exports without raw weights: EMA)")
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
        require(self.eta is None or self.eta >= 0, f"--eta must be >= 0, got {self.eta}")
        require(
            not self.eta or self.scheduler in (None, "ddim"),
            f"--eta applies to --scheduler ddim only, got {self.scheduler}",
        )
        require(self.churn >= 0, f"--churn must be >= 0, got {self.churn}")
        try:
            check_compile_options(self.compile_backend, self.compile_mode)
        except ValueError as err:
            raise InputError(str(err), "compile_mode") from None
        require(
            self.guidance_scale is None or self.guidance_scale >= 0,
            f"--guidance-scale must be >= 0, got {self.guidance_scale}",
        )
        require(not self.per_class_fid or self.fid, "--per-class-fid needs --fid")
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


def choose_sampler(cfg: SampleConfig, loaded: LoadedModel) -> SamplerChoice:
    """The sampler for the loaded model: `--scheduler` or its kind's default, with its steps
    and knobs. A sampler of another kind is refused, and so are --eta and --churn where the
    sampler has no such knob."""
    kind = kind_named(loaded.task, loaded.source)
    if not kind.samplers:  # a kind with one sampler (the basic model)
        if cfg.scheduler is not None or cfg.eta or cfg.churn or cfg.weights != "ema":
            logger.info("--scheduler/--eta/--churn/--weights apply to DDPM and EDM models; ignored")
        return SamplerChoice(None, cfg.num_steps or kind.default_steps(None))
    name = cfg.scheduler or kind.default_sampler
    if name not in kind.samplers:
        raise InputError(
            f"--scheduler {name} is not for {kind.name.upper()} models ({loaded.source}); "
            f"use one of {', '.join(kind.samplers)}"
        )
    if cfg.eta and name != "ddim":
        raise InputError(f"--eta applies to --scheduler ddim only; the sampler is {name}")
    if cfg.churn and "churn" not in kind.knobs:
        raise InputError(f"--churn applies to EDM models only; {loaded.source} is {kind.name}")
    eta = cfg.eta if cfg.eta is not None else DEFAULT_DDIM_ETA if name == "ddim" else 0.0
    return SamplerChoice(name, cfg.num_steps or kind.default_steps(name), eta, cfg.churn)


def choose_classes(cfg: SampleConfig, loaded: LoadedModel) -> tuple[list[int] | None, float]:
    """(the class cycle sample k takes entry k mod n of, the guidance scale); (None, 1) for
    an unconditional model."""
    if not loaded.num_classes:
        if cfg.class_labels is not None or cfg.guidance_scale is not None or cfg.per_class_fid:
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


def make_chunk_fn(
    cfg: SampleConfig,
    loaded: LoadedModel,
    device: torch.device,
    choice: SamplerChoice,
    cycle: list[int] | None = None,
    guidance: float = 1.0,
) -> tuple[Callable[[range], torch.Tensor], list[torch.Tensor], list[int]]:
    """(items -> uint8 NHWC samples, the progression filled by the chunk of item 0, the
    indices of samples that came out non-finite). With a class `cycle`, sample k has class
    cycle[k mod len(cycle)] and is guided with scale `guidance`."""
    draw = kind_named(loaded.task, loaded.source).sampler(
        loaded.model,
        loaded.scheduler_config,
        choice,
        seed=cfg.seed,
        shape=sample_shape(loaded.model, loaded.resolution),
        device=device,
        dtype=DTYPES[cfg.mixed_precision],
        guidance_scale=guidance,
        compile=(cfg.compile_backend, cfg.compile_mode) if cfg.compile else None,
    )
    progression: list[torch.Tensor] = []  # x_t of the first 8 samples, every 1/10 of the steps
    nonfinite: list[int] = []

    def chunk(indices: range) -> torch.Tensor:
        every = math.ceil(choice.steps / 10) if cfg.save_progression and 0 in indices else None
        labels = None if cycle is None else sample_classes(indices, cycle)
        x, snapshots = draw(indices, labels, every)
        progression.extend(s[:8] for s in snapshots)
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        nonfinite.extend(k for k, ok in zip(indices, finite.tolist()) if not ok)
        return torch.from_numpy(to_uint8(x, loaded.value_range))

    return chunk, progression, nonfinite


def sample_classes(indices: range, cycle: list[int]) -> torch.Tensor:
    """Sample k's class: cycle[k mod len(cycle)] (`all` cycles through every class)."""
    return torch.tensor([cycle[k % len(cycle)] for k in indices], dtype=torch.long)


def check_finite_samples(accelerator: Accelerator, nonfinite: list[int], total: int) -> None:
    """Refuse to write images made of NaN/inf (to_uint8 would turn them black), on every rank."""
    count = torch.tensor([len(nonfinite)], device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    if count.item():
        raise NonFiniteError(
            f"{int(count.item())} of {total} samples came out non-finite (NaN/inf), e.g. "
            f"sample(s) {nonfinite[:5] or '(on another process)'}: the model is broken "
            "(diverged weights?) or --mixed-precision fp16 overflows; no images were written"
        )


def check_output(accelerator: Accelerator, cfg: SampleConfig) -> Path:
    """Check the destination before any sampling, writing nothing: a folder, or a place where
    one can be made, that we may write into (collective). Files come with the samples."""
    out, error = Path(cfg.output_dir), None
    if accelerator.is_main_process:
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if out.exists() and not out.is_dir():
            error = InputError(f"{out} is a file, not a folder", "output_dir")
        elif not existing.is_dir():
            error = InputError(f"cannot make {out}: {existing} is a file", "output_dir")
        elif not os.access(existing, os.W_OK | os.X_OK):
            reason = "read-only file system" if _read_only(existing) else "permission denied"
            error = InputError(f"cannot write into {out}: {existing}: {reason}", "output_dir")
    raise_together(accelerator, error, InputError("see the main process's message", "output_dir"))
    return out


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


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


def count_calls(model: torch.nn.Module) -> list[int]:
    """A one-element list counting the model's forward calls (its network evaluations)."""
    calls = [0]

    @torch.compiler.disable  # traced, the count would be a constant of the compiled graph
    def count(*_: object) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(count)
    return calls


def reference_stats(
    cfg: SampleConfig, loaded: LoadedModel, extractor: torch.nn.Module, accelerator: Accelerator
) -> FeatureStats:
    """--fid's reference: `--dataset` at the model's resolution and channels (collective;
    cached and shared with evaluate.py and training). Read before sampling: a bad --dataset
    is refused before anything is written."""
    assert cfg.dataset is not None  # SampleConfig: --fid needs --dataset
    return dataset_stats(
        cfg.dataset,
        loaded.resolution,
        loaded.channels,
        dataset_config=cfg.dataset_config,
        split=cfg.split,
        max_images=cfg.max_reference,
        extractor=extractor,
        batch_size=cfg.batch_size,
        accelerator=accelerator,
    )


def score(
    cfg: SampleConfig,
    loaded: LoadedModel,
    images: np.ndarray,
    labels: np.ndarray | None,
    extractor: torch.nn.Module,
    reference: FeatureStats,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """FID/KID of the samples against the reference (and of each class with --per-class-fid).

    Collective: feature extraction is sharded (chunk k of `--batch-size` images on rank
    k % world).
    """
    samples = torch.from_numpy(images).permute(0, 3, 1, 2)  # NHWC -> NCHW uint8
    sample_stats = compute_feature_stats(
        samples, extractor, accelerator, cfg.batch_size, progress="FID features"
    )
    metrics = {
        **fid_kid(sample_stats, reference, seed=cfg.seed, device=accelerator.device),
        "reference": f"{cfg.dataset} ({cfg.split}, {loaded.resolution}x{loaded.resolution}, "
        f"{loaded.channels} ch)",
    }
    if cfg.per_class_fid:
        assert labels is not None and cfg.dataset is not None  # checked by choose_classes
        data = load_image_data(
            cfg.dataset,
            loaded.resolution,
            loaded.channels,
            dataset_config=cfg.dataset_config,
            split=cfg.split,
            accelerator=accelerator,
            with_labels=True,
        )
        data.images, data.labels = (
            data.images[: cfg.max_reference],
            data.labels[: cfg.max_reference],
        )
        metrics["per_class"] = per_class_fid_kid(
            samples, labels, data.images, data.labels.numpy(), loaded.class_names or [],
            extractor, accelerator, cfg.batch_size, cfg.seed,
        )  # fmt: skip
    return metrics


def sample(cfg: SampleConfig) -> np.ndarray:
    accelerator = new_accelerator()
    setup_logging(accelerator.is_main_process)
    # Every check before any sampling, and nothing written until the samples are.
    extractor = None
    if cfg.fid:
        try:
            extractor = load_fid_inception(accelerator.device)
        except ImportError as err:
            raise ValueError(f"--fid: {err}") from None
    out = check_output(accelerator, cfg)
    # A hub id is downloaded once (by the main process), then read from the cache by the others.
    source = main_process_first(
        accelerator,
        lambda: resolve_model_source(cfg.model_path, None),
        InputError(f"{cfg.model_path} could not be found (the main process says why)"),
    )
    loaded = load_for_sampling(source, cfg.weights)
    if not all_finite(loaded.model.parameters()):
        raise NonFiniteError(
            f"the weights in {loaded.source} hold non-finite values (NaN/inf): that model "
            "diverged; sample an earlier checkpoint"
        )
    choice = choose_sampler(cfg, loaded)
    cycle, guidance = choose_classes(cfg, loaded)
    if accelerator.is_main_process:
        describe_source(cfg, loaded)
        if cfg.fid:
            warn_if_resized(cfg, loaded)
    reference = None if extractor is None else reference_stats(cfg, loaded, extractor, accelerator)
    loaded.model.to(accelerator.device).eval()
    chunk, progression, nonfinite = make_chunk_fn(
        cfg, loaded, accelerator.device, choice, cycle, guidance
    )
    calls = count_calls(loaded.model)
    images = map_sharded(accelerator, cfg.num_samples, cfg.batch_size, chunk, "sampling").numpy()
    check_finite_samples(accelerator, nonfinite, cfg.num_samples)
    labels = None if cycle is None else sample_classes(range(cfg.num_samples), cycle).numpy()
    world, rank = accelerator.num_processes, accelerator.process_index
    num_chunks = len(local_chunks(cfg.num_samples, cfg.batch_size, world, rank))
    error = None
    if accelerator.is_main_process:
        info = {
            "task": loaded.task,
            "source": str(loaded.source),
            "scheduler": choice.name,
            "num_steps": choice.steps,
            # Network evaluations per image (guidance runs two per call, batched).
            "num_evaluations": calls[0] // max(1, num_chunks) * (1 + (guidance not in (0, 1))),
            "eta": choice.eta if choice.name == "ddim" else None,
            "churn": choice.churn if "churn" in kind_named(loaded.task, "").knobs else None,
            "class_names": loaded.class_names,
            "guidance_scale": guidance if cycle is not None else None,
            "num_processes": accelerator.num_processes,
        }
        try:
            write_outputs(cfg, out, images, labels, progression, loaded, info)
        except OSError as err:  # disk full: one message and exit 74, as training's
            error = OutputError(
                f"could not write the samples into {out}: {err.strerror or err}. Free some "
                "space or choose another --output-dir, then run the command again"
            )
    raise_together(accelerator, error, OutputError("the main process could not write"))
    if extractor is not None and reference is not None:
        metrics = score(cfg, loaded, images, labels, extractor, reference, accelerator)
        if accelerator.is_main_process:
            write_json(out / "fid.json", metrics)
            print(
                f"FID {metrics['fid']:.4f} | KID {metrics['kid_mean']:.6f} "
                f"± {metrics['kid_std']:.6f} | {metrics['num_samples']} samples vs "
                f"{metrics['num_reference']} images of {metrics['reference']} -> "
                f"{out / 'fid.json'}"
            )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return images


def write_outputs(
    cfg: SampleConfig,
    out: Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    progression: list[torch.Tensor],
    loaded: LoadedModel,
    info: dict[str, Any],
) -> None:
    """samples.npz (images at their native size, and their classes), grid.png (one class per
    row for a class-conditional model), images/, progression.png, sample_info.json, and last
    sample_config.yaml, so that it always describes the samples beside it. A fid.json of
    earlier samples is removed (--fid writes a new one)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid.json").unlink(missing_ok=True)
    with atomic_file(out / "samples.npz") as f:
        arrays = {"arr_0": images} if labels is None else {"arr_0": images, "labels": labels}
        np.savez(f, **arrays)
    shown, per_row = images[: cfg.grid_size], None
    if labels is not None:
        shown, per_row = rows_by_label(shown, labels[: cfg.grid_size].tolist(), loaded.num_classes)
    # The grid and strip upscaled (nearest) to a viewable size; samples.npz stays native.
    save_png(upscale(make_grid(shown, nrow=per_row), MIN_PICTURE_SIDE), out / "grid.png")
    if cfg.save_images:
        (out / "images").mkdir(exist_ok=True)
        for k, image in enumerate(images):
            save_png(image, out / "images" / f"{k:06d}.png")
    if progression:
        # Rows: steps, columns: the first (up to 8) samples.
        strip = make_grid(
            to_uint8(torch.cat(progression), loaded.value_range), nrow=len(progression[0])
        )
        save_png(upscale(strip, MIN_PICTURE_SIDE), out / "progression.png")
    write_json(out / "sample_info.json", info)
    save_config(cfg, out / "sample_config.yaml")
    logger.info("wrote %d samples to %s", len(images), out / "samples.npz")


def main(argv: list[str] | None = None) -> None:
    sample(parse_config(SampleConfig, argv, description=__doc__))


def cli() -> None:
    """The console script (pyproject's [project.scripts]): main() with the exit codes."""
    cli_main(main)


if __name__ == "__main__":
    cli()
