"""What a model kind is to the rest of the toolkit, and the registry `task.json` is read through.

A kind is a training formulation with everything that depends on it: its loss and training
method, its samplers, its export and model card. The network is a separate axis (any backbone
of `diffusion.networks` works with any kind that takes one). `task.json`, a checkpoint's
state and an export's folder record the kind's name; loading, `sample.py` and `--init-from`
look the kind up here instead of switching on that string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ddp_utils.errors import InputError
from diffusion.codecs import LatentCodec

# (sample indices, their class labels or None, progression_every) -> (images, progression):
# float32 NCHW on the CPU in the kind's value range, and x every N steps (CPU copies).
Draw = Callable[
    [Sequence[int], torch.Tensor | None, int | None], tuple[torch.Tensor, list[torch.Tensor]]
]


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler of a kind and its knobs (eta: DDIM's noise scale; churn: EDM's)."""

    name: str | None
    steps: int
    eta: float = 0.0
    churn: float = 0.0


class Kind(Protocol):
    name: str  # what task.json records
    value_range: tuple[float, float]
    samplers: tuple[str, ...]  # what --scheduler may name (empty: the kind's one sampler)
    default_sampler: str | None
    knobs: frozenset[str]  # the SamplerChoice knobs its samplers take: eta, churn

    def default_steps(self, sampler: str | None) -> int:
        """Steps of a sampler when none are given."""
        ...

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
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        compile: tuple[str, str] | None = None,
        codec: LatentCodec | None = None,
    ) -> Draw:
        """Draw samples of run `seed` from `net` (sample k depends only on (seed, k)), guided
        with scale w at the noise levels in `guidance_interval` (None: every step).
        `compile`: (backend, mode) to torch.compile the denoiser with. `codec`: a latent
        model's; `shape` is then the latents' and the draw returns decoded images."""
        ...


def decoding(draw: Draw, codec: LatentCodec | None, device: torch.device | str) -> Draw:
    """`draw` for a pixel model; for a latent one, the draw with its latents (and the
    progression's) decoded to images: every sampler of every kind decodes here, once."""
    if codec is None:
        return draw
    codec.to(device)

    def decoded(indices, labels, every):
        latents, progression = draw(indices, labels, every)
        return codec.decode(latents), [codec.decode(x) for x in progression]

    return decoded


KINDS: dict[str, Kind] = {}

# Exports of this toolkit that hold no diffusion model, by the task their task.json records:
# what the folder is and what to do with it. Sampling and --init-from refuse them with this.
AUTOENCODER_TASK = "autoencoder"
NOT_DIFFUSION_MODELS: dict[str, str] = {
    AUTOENCODER_TASK: (
        "an autoencoder (a diffusers AutoencoderKL, from train_autoencoder.py), not a diffusion "
        "model: it encodes and decodes images but does not generate them. Give it to a latent "
        "diffusion run as --vae <folder>, or load it with AutoencoderKL.from_pretrained"
    ),
}


def register(kind: Kind) -> Kind:
    KINDS[kind.name] = kind
    return kind


def kind_named(name: str | None, source: object) -> Kind:
    """The kind a model folder, checkpoint or task.json records; unknown names are refused, and
    so are the toolkit's exports that are not diffusion models (saying what to do instead)."""
    import diffusion.kinds  # noqa: F401  (registers every kind)

    if name in NOT_DIFFUSION_MODELS:
        raise InputError(f"{source} holds {NOT_DIFFUSION_MODELS[name]}")
    if name not in KINDS:
        raise InputError(
            f"{source} holds a model of unknown kind {name!r}; this toolkit knows "
            f"{', '.join(KINDS)} (a newer toolkit's export?)"
        )
    return KINDS[name]
