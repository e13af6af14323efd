"""The text-to-image pipelines people have, which `train_ddpm.py --init-from` fine-tunes: the
families supported, how a pipeline folder (or hub id) is recognised, and what a fine-tune of
one exports.

A family is recognised by its `model_index.json`'s `_class_name` (what diffusers'
`save_pretrained` writes). A run started from one takes everything from it: the denoiser (its
weights, and its formulation from its scheduler's config: the kind's `take_from_model`), the
VAE (`--vae` is the pipeline), the text encoder(s) and tokenizer(s) (`--text-encoder` is the
pipeline: `diffusion.text_encoders` reads its `text_encoder/` and `tokenizer/`, and a
pipeline's further ones together). A text-to-image pipeline of another family is refused,
naming those supported.

A full fine-tune exports the base's own pipeline with the trained denoiser: diffusers' stock
class loads it (`StableDiffusionPipeline.from_pretrained`), the base's other components
copied beside it, its scheduler carrying the schedule training used.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from torch import nn

from ddp_utils.errors import InputError
from ddp_utils.files import write_json
from diffusion.codecs import LatentCodec
from diffusion.sources import resolve_model_source
from diffusion.text_encoders import TEXT_ENCODER_HUB_FILES

INDEX_FILE = "model_index.json"
# What a fine-tune reads of a pipeline's files: the denoiser's, the VAE's, the scheduler's, the
# index (the text encoders' are diffusion.text_encoders'); never a pickle, nor the variants
# (fp16, non_ema) or the safety checker a hub repository also holds.
WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model-*-of-*.safetensors")  # fmt: skip
# The noise schedule of a scheduler config: what training may have changed (--prediction-type)
# and an export's scheduler must say; its sampler settings (steps_offset, ...) stay the base's.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                 "trained_betas", "prediction_type")  # fmt: skip
# Files a full export does not copy from the base: pickles (this toolkit reads safetensors
# only) and weight variants the stock loader does not read by default.
NOT_COPIED = ("*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx",
              "*.fp16.safetensors", "*.non_ema.safetensors", ".cache")  # fmt: skip


@dataclass(frozen=True)
class PipelineFamily:
    """A family of text-to-image pipelines --init-from fine-tunes."""

    name: str  # what task.json records
    title: str  # what people call it
    pipeline_class: type[DiffusionPipeline]  # diffusers' stock class: exports, the LoRA format
    denoiser: str  # the component a fine-tune trains (diffusers' name)

    @property
    def class_name(self) -> str:
        return self.pipeline_class.__name__

    def hub_files(self) -> list[str]:
        """What --init-from fetches of a hub repository of this family."""
        return [INDEX_FILE, "scheduler/scheduler_config.json",
                *(f"{part}/{name}" for part in (self.denoiser, "vae") for name in WEIGHT_FILES),
                *TEXT_ENCODER_HUB_FILES]  # fmt: skip


FAMILIES: dict[str, PipelineFamily] = {
    family.class_name: family
    for family in (
        PipelineFamily("stable-diffusion", "Stable Diffusion 1.x/2.x", StableDiffusionPipeline,
                       "unet"),
    )
}  # fmt: skip
FAMILIES_BY_NAME = {family.name: family for family in FAMILIES.values()}
# Text-to-image pipelines known not to be supported yet, by model_index.json's class (any other
# pipeline with a text encoder is refused too).
NOT_YET = {
    "StableDiffusionXLPipeline": "Stable Diffusion XL",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
    "PixArtAlphaPipeline": "PixArt-alpha",
    "PixArtSigmaPipeline": "PixArt-sigma",
}


def supported() -> str:
    """The families supported, for messages."""
    return ", ".join(f"{f.title} ({f.class_name})" for f in FAMILIES.values())


def read_family(folder: Path, spec: str) -> PipelineFamily | None:
    """The family of the pipeline in `folder` (None: not a text-to-image pipeline, e.g. a
    DDPMPipeline or an export of this toolkit); a text-to-image pipeline of another family is
    refused, naming those supported."""
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str):  # this toolkit's exports: ["pipeline", "<ours>"]
        return None
    if name in FAMILIES:
        return FAMILIES[name]
    if name in NOT_YET or "text_encoder" in index:
        title = NOT_YET.get(name, "a text-to-image pipeline")
        raise InputError(
            f"{spec} is a {name} ({title}); --init-from fine-tunes the text-to-image pipelines "
            f"{supported()}",
            "init_from",
        )
    return None


def text_pipeline_family(spec: str) -> PipelineFamily | None:
    """The family of the pipeline `spec` names (a folder, or a hub id: its model_index.json
    from the hub cache, fetched when online), None when it is not a text-to-image pipeline or
    cannot be found now (then the run's loading says why, as for any --init-from)."""
    try:
        folder = resolve_model_source(spec, "init_from", [INDEX_FILE])
    except InputError:
        return None
    return read_family(folder, spec)


def weights_fingerprint(folder: Path) -> str:
    """xxh3-128 of the safetensors weights files of a component folder, in name order: what a
    run records of the base it fine-tunes."""
    digest = xxhash.xxh3_128()
    for path in sorted(folder.glob("diffusion_pytorch_model*.safetensors")):
        if not path.name.endswith((".fp16.safetensors", ".non_ema.safetensors")):
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


@dataclass
class BasePipeline:
    """The pipeline a run fine-tunes: its family, what --init-from named, where its files are."""

    family: PipelineFamily
    source: str  # --init-from as given (a local folder by its absolute path)
    folder: Path
    fingerprint: str  # of the denoiser's weights files (`weights_fingerprint`)

    @classmethod
    def read(cls, folder: Path, spec: str) -> BasePipeline | None:
        family = read_family(folder, spec)
        if family is None:
            return None
        source = (
            str(Path(spec).expanduser().resolve()) if Path(spec).expanduser().exists() else spec
        )
        return cls(family, source, folder, weights_fingerprint(folder / family.denoiser))

    def facts(self) -> dict[str, Any]:
        """What task.json and checkpoints record of the base."""
        return {"family": self.family.name, "pipeline": self.family.class_name,
                "source": self.source, "fingerprint": self.fingerprint}  # fmt: skip

    def export(
        self,
        folder: Path,
        net: nn.Module,
        scheduler_config: dict[str, Any],
        codec: LatentCodec,
    ) -> None:
        """The base's pipeline with `net` as its denoiser into `folder`, for its stock class:
        the base's other components copied (those it does not have, e.g. a safety checker a
        hub download left out, set to none), its VAE as the run used it (the weights file
        byte for byte, the scale in its config), its scheduler with the training schedule."""
        index = json.loads((self.folder / INDEX_FILE).read_text())
        denoiser = self.family.denoiser
        net.save_pretrained(folder / denoiser, safe_serialization=True)
        codec.vae.save_pretrained(folder / "vae", safe_serialization=True)
        codec.ship(folder / "vae")
        base_scheduler = json.loads(
            (self.folder / "scheduler" / "scheduler_config.json").read_text()
        )
        schedule = {k: scheduler_config[k] for k in SCHEDULE_KEYS if k in scheduler_config}
        (folder / "scheduler").mkdir(exist_ok=True)
        write_json(folder / "scheduler" / "scheduler_config.json", {**base_scheduler, **schedule})
        for name, entry in index.items():
            if (
                name.startswith("_")
                or not isinstance(entry, list)
                or name in (denoiser, "vae", "scheduler")
            ):
                continue
            if entry[0] is not None and (self.folder / name).is_dir():
                shutil.copytree(self.folder / name, folder / name,
                                ignore=shutil.ignore_patterns(*NOT_COPIED))  # fmt: skip
            else:
                index[name] = [None, None]
        write_json(folder / INDEX_FILE, index)

    def load_lines(self, prompt: str, guidance_scale: float, adapter: bool = False) -> str:
        """How a card says to sample an export with the stock pipeline: a full one from its
        folder; an adapter put on the base pipeline (diffusers' load_lora_weights)."""
        name = self.family.class_name
        folder = self.source if adapter else "path/to/this/folder"
        lines = [f"from diffusers import {name}",
                 f'pipeline = {name}.from_pretrained("{folder}", use_safetensors=True)']  # fmt: skip
        if adapter:
            lines.append('pipeline.load_lora_weights("path/to/this/folder")')
        lines.append(f"images = pipeline({prompt!r}, guidance_scale={guidance_scale:g}).images")
        return "\n".join(lines)
