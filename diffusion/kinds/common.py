"""What the network kinds share in training: the method's frame (conditions, grids drawn as
sample.py draws, task.json), the loss-by-noise-level report, model-card facts, and an export
folder holding the pipeline's own code."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from ddp_utils.data import to_float
from ddp_utils.errors import InputError
from ddp_utils.export import write_task_file
from ddp_utils.files import write_json, write_text
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.run import Run
from diffusion.adapters import FUSED_FOLDER, RAW_FOLDER, fused, save_adapter
from diffusion.codecs import LatentCodec
from diffusion.conditioning import ConditionSource, condition_source
from diffusion.conditioning.guidance import Guidance
from diffusion.conditioning.text import EMBEDDING_DTYPE, TextCondition
from diffusion.dreambooth import dreambooth_fact, dreambooth_facts
from diffusion.kinds.registry import Kind, SamplerChoice, all_knobs, choose_sampler
from diffusion.networks import Backbone, sample_shape, unwrap
from diffusion.pipeline_code import shipped_source
from diffusion.pipeline_code.core import VALUE_RANGE
from diffusion.sampling import Draw
from diffusion.text_encoders import (
    AnyTextEncoder,
    TextEncoder,
    load_as_recorded,
    shipped,
    text_encoder_changes,
)

NUM_LOSS_BINS = 4  # the loss is also logged per quarter of the noise levels: loss_t_q0..3


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


def network_fact(cfg: Any, backbone: Backbone) -> tuple[str, str]:
    name = backbone.network_class.__name__
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


def condition_facts(source: ConditionSource, guidance: Guidance) -> list[tuple[str, str]]:
    """The condition and its guidance, for the model card (nothing for an unconditional one)."""
    if not source.conditional:
        return []
    return source.card_facts() + [("guidance", f"classifier-free, {source.dropout_fact()}, "
                                               f"{guidance.describe()}")]  # fmt: skip


def card_tags(kind: str, source: ConditionSource, backbone: Backbone) -> list[str]:
    """The hub tags of a model card: the kind, the backbone's, the condition's."""
    return [kind, *backbone.tags, *(source.tags() if source.conditional else [])]


def remote_code_lines(folder_hint: str, call: str) -> str:
    return (
        "from diffusers import DiffusionPipeline\n"
        f'pipeline = DiffusionPipeline.from_pretrained("{folder_hint}", trust_remote_code=True, '
        "use_safetensors=True)  # runs this folder's pipeline.py\n"
        f"images = pipeline({call}).images  # PIL images"
    )


def condition_arguments(source: ConditionSource, guidance: Guidance) -> str:
    """A card's pipeline call's arguments for the condition: a text model's grid prompts and
    guidance, classes, or a batch of an unconditional model."""
    if isinstance(source, TextCondition):
        return f"prompt={source.prompt_texts()!r}, guidance_scale={guidance.scale:g}"
    if source.conditional:
        return "class_labels=[0, 1, 2], guidance_scale=1.5"
    return "batch_size=16"


def text_pipeline_arguments(encoder: AnyTextEncoder, with_mask: bool) -> dict[str, Any]:
    """A text-to-image pipeline's arguments (`NetworkPipeline`) for its `encoder` (as
    `shipped` ships it): its text model(s) and tokenizer(s), how prompts are encoded and
    whether the network takes the mask (`with_mask`), the precision the captions' embeddings
    were stored in. Several encoders (SDXL's, SD3's, Flux's layout) go in as text_encoder,
    text_encoder_2, ... in folder order, with the rule that joins them."""
    arguments = {
        "max_sequence_length": encoder.max_length,
        "prompt_attention_mask": with_mask,
        "prompt_embeds_dtype": str(EMBEDDING_DTYPE).removeprefix("torch."),
    }
    if isinstance(encoder, TextEncoder):
        return {**arguments, "text_encoder": encoder.model, "tokenizer": encoder.tokenizer,
                "text_model_mask": encoder.model_mask}  # fmt: skip
    for part, name in zip(encoder.parts, ("", "_2", "_3"), strict=False):
        arguments[f"text_encoder{name}"], arguments[f"tokenizer{name}"] = part.model, part.tokenizer
    return {
        **arguments,
        "text_join": encoder.rule,
        "text_max_lengths": [part.max_length for part in encoder.parts],
        "text_penultimate": [part.penultimate for part in encoder.parts],
    }


def ship_pipeline(pipeline: DiffusionPipeline, folder: Path, code: ModuleType) -> None:
    """save_pretrained, plus the pipeline's own code as `pipeline.py` (`code`: the kind's
    pipeline module, assembled with the shared runtime): diffusers looks `_class_name` up in its
    own module unless it names a file beside it (and then needs `trust_remote_code=True` to
    run it)."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    class_name = type(pipeline).__name__
    write_json(folder / "model_index.json", {**index, "_class_name": ["pipeline", class_name]})
    write_text(folder / "pipeline.py", shipped_source(code))


def save_raw(folder: Path, raw: nn.Module, backbone: Backbone) -> None:
    """The raw (non-EMA) weights beside the pipeline, in `<component>_raw/`."""
    unwrap(raw).save_pretrained(folder / f"{backbone.component}_raw", safe_serialization=True)


def training_choice(cfg: Any, kind: Kind, scheduler_config: dict[str, Any]) -> SamplerChoice:
    """The sampler of a run's grids and --eval-every: --sample-scheduler, --sample-steps and the
    --sample-<knob> values (the config resolved and checked them), checked against the
    training schedule (known only now for an --init-from model's)."""
    knobs = {name: getattr(cfg, f"sample_{name}", None) for name in all_knobs()}
    return choose_sampler(
        kind, cfg.sample_scheduler, cfg.sample_steps, knobs, source="this run",
        flag=lambda name: f"--sample-{name.replace('_', '-')}",
        scheduler_flag="--sample-scheduler", steps_flag="--sample-steps",
        scheduler_config=scheduler_config,
    )  # fmt: skip


class NetworkMethod:
    """What the network kinds' methods share: a network in [-1, 1], exported as a pipeline
    folder, optionally conditional (its condition source: the grids' layout, the samples'
    conditions, the "no condition" of guidance), sampled by its kind's sampler: the grids are
    drawn as sample.py draws."""

    value_range = VALUE_RANGE
    export_name = "pipeline"
    pipeline_code: ModuleType  # the kind's shipped pipeline module

    def __init__(
        self,
        kind: Kind,
        run: Run,
        scheduler: Any,
        backbone: Backbone,
        codec: LatentCodec | None = None,
    ) -> None:
        self.kind = kind
        self.run, self.cfg, self.scheduler, self.backbone = run, run.cfg, scheduler, backbone
        self.codec = codec  # a latent model's: the samples are decoded, the export ships it
        self.device = run.accelerator.device
        self.source = condition_source(
            run.cfg, run.data.class_names, run.text, run.data.captions, self.device,
            run.validation_prompts,
        )  # fmt: skip
        self.guidance = run.cfg.guidance()
        self.choice = training_choice(run.cfg, self.kind, dict(scheduler.config))

    def task_info(self) -> dict[str, Any]:
        """The task, value range and scheduler, and what sample.py needs of the condition."""
        info = {
            "task": self.kind.name,
            "backbone": self.backbone.name,
            "value_range": list(VALUE_RANGE),
            "scheduler_config": dict(self.scheduler.config),
        }
        if self.source.conditional:
            info.update(self.source.task_info())
            info["guidance_scale"] = self.guidance.scale
            interval = self.guidance.interval
            info["guidance_interval"] = None if interval is None else list(interval)
        if self.codec is not None:
            info["latent"] = self.codec.facts()
        if self.run.base is not None:
            info["base"] = self.run.base.facts()
        if self.run.adapter is not None:
            info["adapter"] = self.run.adapter.facts()
        recipe = dreambooth_facts(self.cfg)
        if recipe:
            info["dreambooth"] = recipe
        return info

    def shard_units(self, net: nn.Module) -> tuple[str, ...]:
        """The backbone's blocks, one FSDP unit each under --sharding."""
        return self.backbone.shard_units(net)

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """Unconditional: 8 per row. Class-conditional: one class per row."""
        return self.source.grid_layout(images)

    def grid_rows(self, num_images: int) -> list[str]:
        """The prompt or class of each row of the grid, its caption ([] unconditional)."""
        return self.source.grid_rows(num_images)

    def draw(self, net: nn.Module) -> Draw:
        return self.kind.sampler(
            net,
            dict(self.scheduler.config),
            self.choice,
            seed=self.cfg.seed,
            shape=sample_shape(net),
            device=self.device,
            null=self.source.null,
            guidance_scale=self.guidance.scale,
            guidance_interval=self.guidance.interval,
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

    def _sample(
        self, net: nn.Module, indices: range, every: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Samples `indices` of the run's seeds with the grids' sampler (and the x's every
        `every` steps)."""
        return self.draw(net)(indices, self.source.for_samples(indices, self.device), every)

    def sample(self, net: nn.Module, indices: range) -> torch.Tensor:
        return self._sample(net, indices)[0]

    def sample_prompts(self, indices: range) -> list[str]:
        """The prompts samples `indices` are drawn with (a text-to-image model's: the
        validation prompts in turn), what --clip-model scores them against."""
        assert isinstance(self.source, TextCondition), "prompts are a text-to-image model's"
        return self.source.prompts_of(indices)

    def export_pipeline(
        self, folder: Path, net: nn.Module, raw: nn.Module, pipeline_class: type
    ) -> None:
        """A pipeline folder of the kind's `pipeline_class` that diffusers runs with
        `trust_remote_code=True`: the EMA network, the scheduler, the condition's names and
        guidance, `pipeline.py`, the raw weights in `<component>_raw/` and a latent model's
        VAE in `vae/`."""
        pipeline = pipeline_class(
            self.scheduler,
            **{self.backbone.component: net},
            **self.pipeline_conditions(),
            **({} if self.codec is None else {"vae": self.codec.vae}),
        )
        ship_pipeline(pipeline, folder, self.pipeline_code)
        self.finish_export(folder, raw)

    def pipeline_conditions(self) -> dict[str, Any]:
        """The pipeline's arguments about the condition: the classes, or a text model's
        encoder, tokenizer and how prompts are encoded for its network; the default
        guidance."""
        conditional = self.source.conditional
        conditions = {
            "class_names": list(self.source.task_info().get("class_names") or []) or None,
            "guidance_scale": self.guidance.scale if conditional else 1.0,
            "guidance_interval": self.guidance.interval,
        }
        encoder = self.shipped_text_encoder()
        if encoder is not None:
            conditions.update(text_pipeline_arguments(encoder, self.source.with_mask))
        return conditions

    def shipped_text_encoder(self) -> AnyTextEncoder | None:
        """A text model's encoder(s) and tokenizer(s) as its export ships them (`shipped`),
        loaded again from where the run recorded them (training let them go once the captions
        were encoded) and checked against the fingerprint it trained with; None for other
        models."""
        if not isinstance(self.source, TextCondition):
            return None
        facts = self.source.encoder_facts
        encoder = load_as_recorded(facts)
        changed = text_encoder_changes(facts, encoder)
        if changed:
            raise InputError(
                f"the export ships the text encoder this run trained with, and {changed[0]}: "
                f"{facts['source']} changed while the run trained; put it back as it was",
                "text_encoder",
            )
        return shipped(encoder)

    def export_base(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        """A fine-tune of a text-to-image pipeline (`diffusion.pipelines`): that pipeline with
        the trained denoiser, which diffusers' stock class loads, and the raw weights beside;
        a LoRA's: the adapter in diffusers' LoRA format (the raw one in raw/), and with
        --export-fused the pipeline with the adapter merged in fused/ (with its task.json)."""
        base, schedule = self.run.base, dict(self.scheduler.config)
        if self.run.adapter is None:
            base.export(folder, net, schedule, self.codec)
            save_raw(folder, raw, self.backbone)
            return
        save_adapter(folder, net, base.family.pipeline_class)
        save_adapter(folder / RAW_FOLDER, raw, base.family.pipeline_class)
        if self.cfg.export_fused:
            base.export(folder / FUSED_FOLDER, fused(net), schedule, self.codec)
            info = {k: v for k, v in self.task_info().items() if k != "adapter"}
            write_task_file(folder / FUSED_FOLDER, self.cfg.resolution, info)

    def base_load_lines(self) -> str:
        """How a card says to sample a fine-tuned pipeline: its stock class (and the adapter
        loaded onto the base), the first grid prompt, the grids' guidance."""
        prompts = self.run.validation_prompts
        return self.run.base.load_lines(
            prompts.texts[0], self.guidance.scale, adapter=self.run.adapter is not None
        )

    def base_facts(self) -> list[tuple[str, str]]:
        """A fine-tuned pipeline's base and adapter, for the model card."""
        base, adapter = self.run.base, self.run.adapter
        if base is None:
            return []
        facts = [("base pipeline", f"{base.family.title} ({base.family.class_name}) "
                                   f"{base.source}")]  # fmt: skip
        if adapter is not None:
            facts.append(("adapter", f"{adapter.describe()} of the {base.family.denoiser}; the "
                                     "base weights frozen"))  # fmt: skip
        recipe = dreambooth_fact(self.cfg)
        if recipe:
            facts.append(("DreamBooth", recipe))
        return facts

    def finish_export(self, folder: Path, raw: nn.Module) -> None:
        """The raw weights and a latent model's VAE beside any export's pipeline."""
        save_raw(folder, raw, self.backbone)
        if self.codec is not None:
            self.codec.ship(folder / "vae")
