"""What the network-based kinds (DDPM, EDM) share in training: the classes, the grids, the
loss-by-noise-level report, and an export folder holding the pipeline's own code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from ddp_utils.data import to_float
from ddp_utils.files import write_json
from ddp_utils.images import make_grid, rows_by_label, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.run import Run
from diffusion.codecs import LatentCodec
from diffusion.conditioning import Conditioning, parse_guidance_interval
from diffusion.ddpm import VALUE_RANGE
from diffusion.kinds.registry import Draw, Kind, SamplerChoice
from diffusion.networks import backbone_of, sample_shape, unwrap
from diffusion.pipeline_code import pipelines

PIPELINE_FILE = Path(pipelines.__file__)  # shipped as pipeline.py
NUM_LOSS_BINS = 4  # the loss is also logged per quarter of the noise levels: loss_t_q0..3
NETWORK_CLASSES = {"unet": "UNet2DModel", "dit": "DiTTransformer2DModel"}


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


def network_fact(cfg: Any, backbone: str) -> tuple[str, str]:
    name = NETWORK_CLASSES[backbone]
    return ("network", f"{name}, fine-tuned from {cfg.init_from}" if cfg.init_from
            else f"{name}, preset {cfg.preset}")  # fmt: skip


def codec_facts(codec: LatentCodec | None) -> list[tuple[str, str]]:
    """A latent model's autoencoder, for the model card."""
    if codec is None:
        return []
    channels, _ = codec.latent_shape(codec.downsampling)
    return [
        ("autoencoder", f"AutoencoderKL {codec.source} (frozen; in vae/), {channels} latent "
                        f"channels at 1/{codec.downsampling} of the image size, latents scaled by "
                        f"{codec.scaling_factor:.5g}"
                        + (" after per-channel normalization (latents_mean, latents_std)"
                           if codec.per_channel else "")),
    ]  # fmt: skip


def classes_facts(conditioning: Conditioning) -> list[tuple[str, str]]:
    if not conditioning.num_classes:
        return []
    interval = conditioning.guidance_interval
    where = (
        "every step"
        if interval is None
        else f"noise levels sigma in ({interval[0]:g}, {interval[1]:g}]"
    )
    return [
        ("classes", ", ".join(conditioning.class_names)),
        ("guidance", f"classifier-free, label dropout {conditioning.label_dropout}, default "
                     f"scale {conditioning.guidance_scale} at {where}"),
    ]  # fmt: skip


def card_tags(kind: str, conditioning: Conditioning, backbone: str) -> list[str]:
    """The hub tags of a model card: the kind, the transformer, class conditioning."""
    tags = [kind] + (["dit", "transformer"] if backbone == "dit" else [])
    return tags + (["class-conditional"] if conditioning.num_classes else [])


def remote_code_lines(folder_hint: str, call: str) -> str:
    return (
        "from diffusers import DiffusionPipeline\n"
        f'pipeline = DiffusionPipeline.from_pretrained("{folder_hint}", trust_remote_code=True, '
        "use_safetensors=True)  # runs this folder's pipeline.py\n"
        f"images = pipeline({call}).images  # PIL images"
    )


def network_component(net: nn.Module) -> str:
    """The pipeline component holding the network: `unet`, or `transformer` for a DiT (as
    diffusers names them)."""
    return "transformer" if backbone_of(net) == "dit" else "unet"


def ship_pipeline(pipeline: DiffusionPipeline, folder: Path, class_name: str) -> None:
    """save_pretrained, plus the pipeline's own code as `pipeline.py`: diffusers looks
    `_class_name` up in its own module unless it names a file beside it (and then needs
    `trust_remote_code=True` to run it)."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    write_json(folder / "model_index.json", {**index, "_class_name": ["pipeline", class_name]})
    shutil.copyfile(PIPELINE_FILE, folder / "pipeline.py")


def save_raw(folder: Path, raw: nn.Module) -> None:
    """The raw (non-EMA) weights beside the pipeline, in `<component>_raw/`."""
    unwrap(raw).save_pretrained(folder / f"{network_component(raw)}_raw", safe_serialization=True)


class NetworkMethod:
    """What the DDPM and EDM methods share: a network in [-1, 1], exported as a pipeline folder,
    optionally class-conditional (grids one class per row, guided samples), sampled by its
    kind's sampler: the grids are drawn as sample.py draws."""

    value_range = VALUE_RANGE
    export_name = "pipeline"
    kind: Kind

    def __init__(
        self, run: Run, scheduler: Any, backbone: str, codec: LatentCodec | None = None
    ) -> None:
        self.run, self.cfg, self.scheduler, self.backbone = run, run.cfg, scheduler, backbone
        self.codec = codec  # a latent model's: the samples are decoded, the export ships it
        self.device = run.accelerator.device
        cfg = run.cfg
        if cfg.class_conditional:
            names = tuple(run.data.class_names or ())
            interval = parse_guidance_interval(
                cfg.sample_guidance_interval, "sample_guidance_interval"
            )
            self.conditioning = Conditioning(
                names, cfg.label_dropout, cfg.sample_guidance_scale, interval
            )
        else:
            self.conditioning = Conditioning()
        self.choice = SamplerChoice(cfg.sample_scheduler, cfg.sample_steps, cfg.sample_eta)

    def task_info(self) -> dict[str, Any]:
        """The task, value range and scheduler, and what sample.py needs of the classes."""
        info = {
            "task": self.kind.name,
            "backbone": self.backbone,
            "value_range": list(VALUE_RANGE),
            "scheduler_config": dict(self.scheduler.config),
        }
        if self.conditioning.num_classes:
            info["class_names"] = list(self.conditioning.class_names)
            info["guidance_scale"] = self.conditioning.guidance_scale
            interval = self.conditioning.guidance_interval
            info["guidance_interval"] = None if interval is None else list(interval)
        if self.codec is not None:
            info["latent"] = self.codec.facts()
        return info

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """Unconditional: 8 per row. Class-conditional: one class per row (sample k: class k
        mod C)."""
        conditioning = self.conditioning
        if not conditioning.num_classes:
            return images, 8
        labels = conditioning.sample_labels(range(len(images)))
        return rows_by_label(images, labels.tolist(), conditioning.num_classes)

    def draw(self, net: nn.Module) -> Draw:
        return self.kind.sampler(
            net,
            dict(self.scheduler.config),
            self.choice,
            seed=self.cfg.seed,
            shape=sample_shape(net),
            device=self.device,
            guidance_scale=self.conditioning.guidance_scale,
            guidance_interval=self.conditioning.guidance_interval,
            codec=self.codec,
        )

    def data_batch(self, num: int) -> torch.Tensor:
        """The first `num` training images as the network sees them (latents of a latent
        model: the posterior means, scaled), on the device."""
        if self.codec is None:
            return to_float(self.run.data.images[:num].to(self.device), VALUE_RANGE, None)
        latents = self.run.latents
        return (latents.means(num).to(self.device) - latents.shift) * latents.scale

    def shown(self, x: torch.Tensor) -> torch.Tensor:
        """What a picture shows of x: the images (decoded, for a latent model)."""
        return x if self.codec is None else self.codec.decode(x)

    def vae_component(self) -> dict[str, Any]:
        """The export's `vae` component of a latent model (none for a pixel one)."""
        return {} if self.codec is None else {"vae": self.codec.vae}

    def _sample(
        self, net: nn.Module, indices: range, every: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Samples `indices` of the run's seeds with the grids' sampler (and the x's every
        `every` steps)."""
        return self.draw(net)(indices, self.conditioning.sample_labels(indices), every)

    def sample(self, net: nn.Module, indices: range) -> torch.Tensor:
        return self._sample(net, indices)[0]
