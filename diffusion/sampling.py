"""What every kind's sampling shares in the toolkit: per-sample seeding, autocast of the
network, and decoding a latent model's draw. (The samplers themselves: those written once over
a denoiser in `pipeline_code/samplers.py`, shipped with exports; a kind's own in its folder.)

Reproducibility contract: image k of a run with seed s depends only on (s, k) and the weights,
never on the batch it was drawn in or on how many processes split the work. Each sample owns a
CPU `torch.Generator` seeded with `sample_seed(s, k)` that supplies its initial noise and every
stochastic step's noise. CPU generators are used because CUDA and CPU RNG streams differ: the
same seed gives the same noise on any device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from diffusion.codecs import LatentCodec
from diffusion.pipeline_code.core import Condition

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finalizer (Steele et al. 2014): a bijective, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """The 63-bit RNG seed of sample `index` in a run seeded with `seed`.

    Hashing (rather than `seed + index`) keeps runs with nearby seeds from sharing samples
    (seed 1's sample 0 would otherwise be seed 0's sample 1). 63 bits fit a signed int64.
    """
    if index < 0:
        raise ValueError(f"sample index must be >= 0; got {index}")
    return _splitmix64(_splitmix64(seed & _MASK64) ^ index) >> 1


def make_sample_generators(seed: int, sample_indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with `sample_seed(seed, k)`."""
    if len(sample_indices) == 0:
        raise ValueError("sample_indices must name at least one sample")
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, k)) for k in sample_indices]


_AUTOCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def model_autocast(
    device: torch.device | str, dtype: torch.dtype
) -> contextlib.AbstractContextManager:
    """Autocast context for the model forward in `dtype`; a no-op for float32.

    Only the network runs in reduced precision; callers keep the latent x_t and the scheduler
    arithmetic in float32, where rounding would otherwise accumulate over hundreds of steps.
    """
    if dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be one of {_AUTOCAST_DTYPES}; got {dtype}")
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# (sample indices, their condition or None, progression_every) -> (images, progression).
Draw = Callable[
    [Sequence[int], Condition | None, int | None], tuple[torch.Tensor, list[torch.Tensor]]
]


def decoding(draw: Draw, codec: LatentCodec | None, device: torch.device | str) -> Draw:
    """`draw` for a pixel model; for a latent one, the draw with its latents (and the
    progression's) decoded to images: every sampler of every kind decodes here, once."""
    if codec is None:
        return draw
    codec.to(device)

    def decoded(indices, condition, every):
        latents, progression = draw(indices, condition, every)
        return codec.decode(latents), [codec.decode(x) for x in progression]

    return decoded


def on_device(condition: Condition | None, device: torch.device | str) -> Condition | None:
    """A condition's tensors on `device`."""
    if condition is None:
        return None
    return {key: value.to(device) for key, value in condition.items()}
