"""The basic model: a network predicts the clean image from a blend with uniform noise, and
sampling steps from noise toward its prediction (no timesteps, no noise schedule). Trained by
train_basic.py; its math is in formulation.py."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddp_utils.compile import compile_network
from ddp_utils.data import Batch, to_float
from ddp_utils.images import make_grid, to_uint8
from ddp_utils.metrics import MetricWindow
from ddp_utils.model_card import CardFacts
from ddp_utils.run import Run
from diffusion.codecs import LatentCodec
from diffusion.kinds.basic.formulation import VALUE_RANGE, corrupt, sample_basic
from diffusion.kinds.registry import NullCondition, SamplerChoice, register
from diffusion.networks import backbone_of, predict
from diffusion.sampling import Draw

DEFAULT_STEPS = 40  # steps toward the prediction when none are given (5 to 50 work)


class BasicKind:
    name = "basic"
    summary = "predict the clean image from a blend with uniform noise"
    trained_by = "train_basic.py"
    value_range = VALUE_RANGE
    samplers: dict = {}  # one sampler, without a name or knobs
    default_sampler = None
    default_steps = DEFAULT_STEPS
    options = None

    def sampler(
        self,
        net: nn.Module,
        scheduler_config: Mapping[str, Any] | None,
        choice: SamplerChoice,
        *,
        seed: int,
        shape: tuple[int, int, int],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        null: NullCondition | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        compile: tuple[str, str] | None = None,
        codec: LatentCodec | None = None,
    ) -> Draw:
        if codec is not None:
            raise ValueError("the basic model has no latent form")
        if compile is not None:  # the network is the whole denoiser
            compile_network(net, *compile)

        def draw(indices, condition, every):
            return sample_basic(net, choice.steps, shape, indices, seed, device, dtype), []

        return draw

    def method(self, run: Run) -> BasicMethod:
        return BasicMethod(run)


BASIC = register(BasicKind())


class BasicMethod:
    """Predict the clean image from a blend with uniform noise (MSE)."""

    value_range = VALUE_RANGE
    export_name = "model"
    kind = BASIC

    def __init__(self, run: Run) -> None:
        self.run = run
        self.device = run.accelerator.device

    def task_info(self) -> dict[str, Any]:
        return {"task": self.kind.name, "value_range": list(VALUE_RANGE)}

    def shard_units(self, net: nn.Module) -> tuple[str, ...]:
        """The network's blocks, one FSDP unit each under --sharding (its backbone's)."""
        return backbone_of(net).shard_units(net)

    def loss(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, stats: MetricWindow
    ) -> torch.Tensor:
        x = batch.images
        amount = torch.rand(x.shape[0], generator=generator, device=x.device)
        noise = torch.rand(x.shape, generator=generator, device=x.device)
        pred = predict(model, corrupt(x, amount, noise), 0)
        return F.mse_loss(pred.float(), x)

    def sample(self, net: nn.Module, indices: range) -> torch.Tensor:
        cfg = self.run.cfg
        draw = self.kind.sampler(
            net,
            None,
            SamplerChoice(None, cfg.sample_steps),
            seed=cfg.seed,
            shape=(cfg.channels, cfg.resolution, cfg.resolution),
            device=self.device,
        )
        return draw(indices, None, None)[0]

    @torch.no_grad()
    def pictures(self, net: nn.Module, step: int) -> dict[str, np.ndarray]:
        """Three rows: clean images, corrupted with amounts 0..1, the network's predictions."""
        x = to_float(self.run.data.images[:8].to(self.device), VALUE_RANGE, None)
        amount = torch.linspace(0, 1, x.shape[0], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.run.cfg.seed)
        noisy = corrupt(x, amount, generator=generator)
        pred = predict(net, noisy, 0).float().clamp(0, 1)
        rows = torch.cat([x, noisy, pred])
        return {"corruption_panel": make_grid(to_uint8(rows, VALUE_RANGE), nrow=x.shape[0])}

    def data_pictures(self) -> dict[str, np.ndarray]:
        return {}

    def grid_layout(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        return images, 8

    def grid_rows(self, num_images: int) -> list[str]:
        return []

    def export(self, folder: Path, net: nn.Module, raw: nn.Module) -> None:
        net.save_pretrained(folder, safe_serialization=True)

    def card(self) -> CardFacts:
        cfg = self.run.cfg
        network = "BasicUNet (this toolkit's)" if cfg.model == "basic" else "UNet2DModel"
        return CardFacts(
            title=f"Basic denoiser on {cfg.dataset}",
            summary=(
                f"A {network} that predicts the clean image from a {cfg.resolution}x"
                f"{cfg.resolution} image blended with uniform noise by an amount in [0, 1]; it "
                "generates images from pure noise by stepping toward its prediction."
            ),
            script=self.kind.trained_by,
            sampler=(
                f"{cfg.sample_steps} steps toward the prediction made the grid above "
                "(`python sample.py <folder> --num-steps N`; 5 to 50 work)."
            ),
            how_to_load=(
                "from pathlib import Path\n"
                "from diffusion.loading import load_for_sampling  # this toolkit\n"
                'loaded = load_for_sampling(Path("path/to/this/folder"))  # .model, .resolution'
            ),
            facts=[("objective", "MSE to the clean image"), ("network", network)],
            tags=["denoiser"],
        )
