"""LoRA adapters (Hu et al. 2021) on a pretrained pipeline's denoiser, through peft and diffusers'
own integration (`ModelMixin.add_adapter`): `--lora-rank` trains a low-rank update
W + (alpha / r) B A of the chosen linear layers (by default the attention projections) while
the base weights stay frozen, bit for bit.

What trains is the adapter alone: the optimizer, the EMA and the checkpoints hold its
parameters (megabytes; the base is read again from --init-from, checked by its fingerprint).
The export is the adapter in diffusers' LoRA format (`pytorch_lora_weights.safetensors`, its
LoraConfig in the file's metadata): `pipeline.load_lora_weights(folder)` puts it on the base
pipeline. On request (`--export-fused`) the export also holds the base pipeline with the
adapter merged into its weights.

The adapter's initial A is drawn from a seed derived from the run's (B starts at zero, so the
first step's network is the base's): the same on every process and every restart. Its dropout
draws from the global RNG, which the training loop seeds at every micro-step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from ddp_utils.config import option, require

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA's weights
RAW_FOLDER = "raw"  # the raw (non-EMA) adapter, beside the shipped one
FUSED_FOLDER = "fused"  # --export-fused: the base pipeline with the adapter merged
ADAPTER_NAME = "default"  # peft's name of the one adapter
# The layers a LoRA adapts by default: the attention projections (queries, keys, values, the
# output) of every attention block, self- and cross-, as diffusers' LoRA examples have it.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
SECTION = "Fine-tuning a pipeline with LoRA (--init-from a text-to-image pipeline)"


@dataclass
class AdapterOptions:
    """LoRA's section of the training config."""

    lora_rank: int | None = option(
        None,
        "train a LoRA adapter of this rank on --init-from's denoiser instead of all its weights "
        "(the base stays frozen; checkpoints and the export hold the adapter); none: a full "
        "fine-tune",
        section=SECTION,
    )
    lora_alpha: float | None = option(
        None, "the adapter's scale is alpha / rank (default: the rank, a scale of 1)",
        section=SECTION,
    )  # fmt: skip
    lora_dropout: float = option(
        0.0, "dropout on the adapter's input (drawn per micro-step: resume stays exact)",
        section=SECTION,
    )  # fmt: skip
    lora_target_modules: list[str] | None = option(
        None,
        "the layers adapted, by the end of their names (peft's target_modules: 'to_q' adapts "
        f"every ...to_q); default: the attention projections {' '.join(ATTENTION_PROJECTIONS)}",
        section=SECTION,
    )
    export_fused: bool = option(
        False,
        "with --lora-rank, also export the base pipeline with the adapter merged into its "
        "weights (the export's fused/: a full pipeline, no LoRA loading needed)",
        section=SECTION,
    )

    def check_adapter_options(self, pipeline: str | None) -> None:
        """LoRA applies to a pipeline's fine-tune; its flags without --lora-rank are refused."""
        if self.lora_rank is None:
            for name, default in (("lora_alpha", None), ("lora_dropout", 0.0),
                                  ("lora_target_modules", None), ("export_fused", False)):  # fmt: skip
                require(
                    getattr(self, name) == default,
                    f"--{name.replace('_', '-')} applies to LoRA fine-tunes only: add "
                    "--lora-rank, or drop it",
                )
            return
        require(
            pipeline is not None,
            "--lora-rank adapts a text-to-image pipeline's denoiser: give --init-from a "
            "pipeline folder or hub id (a full fine-tune of any other model: drop --lora-rank)",
        )
        require(self.lora_rank >= 1, f"--lora-rank must be >= 1, got {self.lora_rank}")
        require(
            self.lora_alpha is None or self.lora_alpha > 0,
            f"--lora-alpha must be > 0, got {self.lora_alpha}",
        )
        require(
            0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"
        )
        require(
            self.lora_target_modules is None
            or (self.lora_target_modules and all(m.strip() for m in self.lora_target_modules)),
            f"--lora-target-modules needs at least one name, none blank; got "
            f"{self.lora_target_modules}",
        )

    def adapter(self) -> LoraSpec | None:
        """The adapter the flags ask for (None: a full fine-tune)."""
        if self.lora_rank is None:
            return None
        return LoraSpec(
            self.lora_rank,
            float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank),
            self.lora_dropout,
            tuple(self.lora_target_modules or ATTENTION_PROJECTIONS),
        )


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter's shape: rank r, alpha (the update is scaled by alpha / r), dropout, the
    layers it adapts."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    def config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets), init_lora_weights="gaussian")  # fmt: skip

    def facts(self) -> dict[str, Any]:
        """What task.json and checkpoints record of it (loading rebuilds it from this)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets)}  # fmt: skip

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> LoraSpec:
        return cls(int(facts["rank"]), float(facts["alpha"]), float(facts["dropout"]),
                   tuple(facts["targets"]))  # fmt: skip

    def describe(self) -> str:
        return (f"LoRA of rank {self.rank}, alpha {self.alpha:g}, dropout {self.dropout:g} on "
                f"{', '.join(self.targets)}")  # fmt: skip


def add_lora(net: nn.Module, spec: LoraSpec, seed: int = 0) -> None:
    """Freeze `net` and add the adapter: A drawn from a generator of `seed` (the global RNG
    left as it was), B zero. A target that matches no layer is a ValueError naming it."""
    net.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            net.add_adapter(spec.config(), adapter_name=ADAPTER_NAME)
        except ValueError as err:  # peft: "Target modules {...} not found in the base model"
            raise ValueError(
                f"{', '.join(spec.targets)}: {err}. Name layers the network has (by the end of "
                f"their names), e.g. {' '.join(ATTENTION_PROJECTIONS)}"
            ) from None


def adapter_layers(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights as diffusers saves a model's LoRA (`save_lora_adapter`): peft's
    names without the adapter's, `...to_q.lora_A.weight`."""
    return {k: v.detach().contiguous() for k, v in
            get_peft_model_state_dict(net, adapter_name=ADAPTER_NAME).items()}  # fmt: skip


def adapter_metadata(net: nn.Module) -> dict[str, Any]:
    """The adapter's LoraConfig as diffusers stores it in the file's metadata (what
    load_lora_weights rebuilds the adapter from: rank, alpha, targets), sets sorted so that
    two identical runs write the same bytes. Its dropout is 0: dropout is training's, and
    diffusers' load_lora_weights leaves the layers it adds in training mode (in a pipeline
    whose models are in eval mode), where a dropout would drop inputs at inference."""
    config = net.peft_config[ADAPTER_NAME].to_dict()
    config["lora_dropout"] = 0.0
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_adapter(folder: Path, net: nn.Module, pipeline_class: Any) -> None:
    """The adapter of `net` in diffusers' LoRA format (`pipeline_class.save_lora_weights`:
    `unet.`-prefixed peft names, the config in the metadata) as `folder/ADAPTER_FILE`."""
    pipeline_class.save_lora_weights(
        folder,
        unet_lora_layers=adapter_layers(net),
        unet_lora_adapter_metadata=adapter_metadata(net),
        safe_serialization=True,
    )


def load_adapter(net: nn.Module, folder: Path) -> None:
    """Put the adapter saved in `folder` (`save_adapter`) on `net`, as diffusers'
    load_lora_weights does: its config from the file's metadata."""
    net.load_lora_adapter(str(folder), prefix="unet", weight_name=ADAPTER_FILE,
                          adapter_name=ADAPTER_NAME)  # fmt: skip


def fused(net: nn.Module) -> nn.Module:
    """A copy of `net` with its adapter merged into the base weights and removed: a plain
    network of the base's class."""
    merged = copy.deepcopy(net)
    merged.fuse_lora(adapter_names=[ADAPTER_NAME])
    merged.unload_lora()
    return merged
