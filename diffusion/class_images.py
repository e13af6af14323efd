"""DreamBooth's class images (`--class-prompt`, prior preservation): drawn once by the base
pipeline's own denoiser, before any training step, stored in the run directory
(`class_images/`), reused by every later run of the same command, and added to the run's data:
their latents are encoded and their prompt into the caches as the instance images' are.

They are drawn as `sample.py` draws the base pipeline folder (its UNet, VAE, text encoder and
noise schedule): the class prompt, DDIM over NUM_STEPS steps (eta 0), classifier-free guidance
GUIDANCE_SCALE against the empty prompt, in the run's mixed precision; image k from the seed
(class_images_seed(--seed), k), so that the images are the same on any number of processes
(the work is sharded as sample.py shards it). `class_images/drawn.json` records how, with the
sample.py command that draws the same images.

A run that resumes a checkpoint reads them back (PNG is lossless: the pixels trained on);
one whose class images were drawn for another prompt, number, seed or base is refused, naming
the fix. A fresh run (no checkpoint) draws them anew when they do not fit its flags.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddp_utils.data import ImageData
from ddp_utils.distributed import derive_seed, main_process_first, map_sharded, raise_together
from ddp_utils.errors import InputError, OutputError
from ddp_utils.files import atomic_dir, write_json
from ddp_utils.images import save_png
from ddp_utils.run import Run
from ddp_utils.sample_output import check_finite_samples
from diffusion.drawing import SampleConfig, choose_condition, make_chunk_fn, sampler_choice
from diffusion.loading import LoadedModel, load_for_sampling
from diffusion.pipelines import BasePipeline
from diffusion.pretrained import init_source

logger = logging.getLogger("ddp_diffusion")

CLASS_IMAGES_DIR = "class_images"  # in the run directory
RECORD_FILE = "drawn.json"  # how they were drawn: what a later run compares
# How the base draws them: a deterministic sampler (eta 0), Stable Diffusion's usual number
# of steps and guidance (diffusers' pipelines' defaults, which its train_dreambooth.py uses).
SAMPLER = "ddim"
NUM_STEPS = 50
ETA = 0.0
GUIDANCE_SCALE = 7.5


def class_images_seed(seed: int) -> int:
    """The seed of the class images (image k: its sample seed k): derived from --seed, and not
    the grids' seeds, whose samples would otherwise start from the same noise."""
    return derive_seed("class images", seed)


def drawing_record(cfg: Any, base: BasePipeline, precision: str) -> dict[str, Any]:
    """What the class images are a function of (compared with a stored set's)."""
    return {
        "prompt": cfg.class_prompt,
        "num_images": cfg.num_class_images,
        "seed": class_images_seed(cfg.seed),
        "sampler": SAMPLER,
        "num_steps": NUM_STEPS,
        "eta": ETA,
        "guidance_scale": GUIDANCE_SCALE,
        "mixed_precision": precision,
        "base": base.facts(),
    }


def sample_command(record: dict[str, Any]) -> str:
    """The sample.py command that draws the same images from the base pipeline."""
    return shlex.join([
        "python", "sample.py", record["base"]["source"], "--prompt", record["prompt"],
        "--num-samples", str(record["num_images"]), "--seed", str(record["seed"]),
        "--scheduler", record["sampler"], "--num-steps", str(record["num_steps"]),
        "--eta", f"{record['eta']:g}", "--guidance-scale", f"{record['guidance_scale']:g}",
        "--mixed-precision", record["mixed_precision"],
    ])  # fmt: skip


def image_name(k: int) -> str:
    return f"{k:06d}.png"


def read_class_images(folder: Path) -> tuple[dict[str, Any], np.ndarray] | None:
    """(the record, the images NHWC uint8) stored in `folder`, or None when it is missing or
    incomplete (an image missing or unreadable)."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
        images = []
        for k in range(record["num_images"]):
            with Image.open(folder / image_name(k)) as image:
                images.append(np.asarray(image.convert("RGB")))
        return record, np.stack(images)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_class_images(run: Run) -> None:
    """--class-prompt: the class images (read from the run directory, or drawn by the base and
    stored there), as `run.prior`; their prompt joins the data's captions. Collective."""
    cfg, accelerator = run.cfg, run.accelerator
    if cfg.class_prompt is None:
        return
    source = init_source(run)
    base = BasePipeline.read(source, cfg.init_from)
    precision = cfg.mixed_precision or accelerator.mixed_precision or "no"
    record = drawing_record(cfg, base, precision)
    folder = run.output_dir / CLASS_IMAGES_DIR
    stored = read_class_images(folder)
    # Every rank decides alike: reuse only when every rank read the same fitting set.
    drawn_otherwise = stored is not None and comparable(stored[0]) != comparable(record)
    fits = stored is not None and not drawn_otherwise
    if accelerator.num_processes > 1:
        flags = accelerator.gather(torch.tensor([int(fits)], device=accelerator.device))
        fits = bool(flags.min().item())
    if fits:
        images = stored[1]
        logger.info("class images: the %d in %s, as drawn before", len(images), folder)
    else:
        error = None
        if drawn_otherwise and run.checkpoint is not None:
            error = refusal(folder, stored[0], record, run.checkpoint.path)
        raise_together(accelerator, error, InputError("cannot be resumed (see the main process)"))
        if run.checkpoint is not None:
            logger.warning(
                "class images: none in %s (removed, damaged, or the checkpoint is another "
                "run's); drawing them again from the same seeds (the same images on the same "
                "kind of device)",
                folder,
            )
        images = draw(run, source, record)
        store(run, folder, images, record)
    run.prior = class_data(run, images, record)


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what may differ between two runs drawing the same images (the base's
    path: its weights' fingerprint says whether it is the same)."""
    base = {k: v for k, v in record.get("base", {}).items() if k != "source"}
    return {**{k: v for k, v in record.items() if k not in ("command",)}, "base": base}


def refusal(
    folder: Path, stored: dict[str, Any], record: dict[str, Any], checkpoint: Path
) -> InputError:
    """The error of a resume whose class images were drawn otherwise."""
    old, new = comparable(stored), comparable(record)
    flags = {"prompt": "--class-prompt", "num_images": "--num-class-images", "seed": "--seed",
             "base": "--init-from (its UNet weights)", "mixed_precision": "--mixed-precision"}  # fmt: skip
    differences = [
        f"{flags.get(key, key)}: {old.get(key)!r} there, {new.get(key)!r} now"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    return InputError(
        f"{checkpoint} was trained with the class images in {folder}, drawn otherwise than "
        "this run asks:\n  " + "\n  ".join(differences) + "\ngive the flags it was trained "
        "with (its config.yaml) to resume it; or start over with --resume none or another "
        "--output-dir (the class images are then drawn anew)",
        "class_prompt",
    )


def draw(run: Run, source: Path, record: dict[str, Any]) -> np.ndarray:
    """The class images (NHWC uint8) drawn by the base pipeline in `source` as sample.py draws
    it, sharded over the run's processes."""
    cfg, accelerator = run.cfg, run.accelerator
    options = SampleConfig(
        model_path=str(source), num_samples=record["num_images"], batch_size=cfg.batch_size,
        seed=record["seed"], num_steps=record["num_steps"], scheduler=record["sampler"],
        prompt=[record["prompt"]], guidance_scale=record["guidance_scale"], eta=record["eta"],
        mixed_precision=record["mixed_precision"],
    )  # fmt: skip
    loaded = load_for_sampling(source)
    check_fits_data(loaded, cfg)
    choice = sampler_choice(options, loaded)
    condition, guidance = main_process_first(
        accelerator,
        lambda: choose_condition(options, loaded, accelerator.device),
        InputError("the class prompt could not be encoded (the main process says why)",
                   "class_prompt"),
    )  # fmt: skip
    logger.info(
        "class images: the base draws %d of %r (DDIM-%d, guidance %g), once: %s",
        record["num_images"], record["prompt"], NUM_STEPS, GUIDANCE_SCALE, sample_command(record),
    )  # fmt: skip
    loaded.model.to(accelerator.device).eval()
    chunk, _, nonfinite = make_chunk_fn(
        options, loaded, accelerator.device, choice, condition, guidance
    )
    images = map_sharded(accelerator, record["num_images"], cfg.batch_size, chunk, "class images")
    check_finite_samples(accelerator, nonfinite, record["num_images"])
    loaded.model.to("cpu")
    return images.numpy()


def check_fits_data(loaded: LoadedModel, cfg: Any) -> None:
    """The base draws images of its own size: refuse data of another size now (the fine-tune
    would refuse it too), before any drawing."""
    if (loaded.resolution, loaded.channels) != (cfg.resolution, cfg.channels):
        raise InputError(
            f"{cfg.init_from} draws {loaded.channels}-channel {loaded.resolution}x"
            f"{loaded.resolution} images and the data is {cfg.channels}-channel "
            f"{cfg.resolution}x{cfg.resolution}: pass --resolution {loaded.resolution} "
            f"--channels {loaded.channels}",
            "init_from",
        )


def store(run: Run, folder: Path, images: np.ndarray, record: dict[str, Any]) -> None:
    """The images as PNGs and their record, replacing `folder` at once (the writer's)."""
    error = None
    if run.is_writer:
        try:
            for leftover in folder.parent.glob(f".{folder.name}.*"):  # a killed store's
                shutil.rmtree(leftover, ignore_errors=True)
            with atomic_dir(folder) as tmp:
                for k, image in enumerate(images):
                    save_png(image, tmp / image_name(k))
                write_json(tmp / RECORD_FILE, {**record, "command": sample_command(record)})
        except OSError as err:
            error = OutputError(f"could not write the class images into {folder}: "
                                f"{err.strerror or err}")  # fmt: skip
    raise_together(run.accelerator, error, OutputError("the main process could not write"))
    run.accelerator.wait_for_everyone()


def class_data(run: Run, images: np.ndarray, record: dict[str, Any]) -> ImageData:
    """The class images as the run's data: captioned by the class prompt, in rows after the
    data's own among `run.data.captions` (which now holds them)."""
    data = run.data
    assert data.captions is not None, "a pipeline's fine-tune is captioned"
    first_row = data.captions.num_rows
    data.captions = data.captions.with_rows(record["prompt"], len(images))
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:24]
    return ImageData(
        images=pixels,
        fingerprint=f"class-images-{digest}",
        source=f"{len(images)} class images of {record['prompt']!r} drawn by the base",
        labels=torch.arange(first_row, first_row + len(images), dtype=torch.int64),
        captions=data.captions,
    )
