"""The basic diffusion model: blend images with uniform noise, learn to undo the blend.

Unlike DDPM there is no noise schedule and no timestep: the network sees x_noisy and predicts
x0 directly, and sampling walks from pure noise towards the prediction in shrinking steps.
Pixels live in [0, 1] (`VALUE_RANGE`), the same range as the uniform noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffusion.networks import predict
from diffusion.sampling import make_sample_generators, model_autocast

VALUE_RANGE = (0.0, 1.0)


def corrupt(
    x: torch.Tensor,
    amount: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_noisy = (1 - amount) * x + amount * noise, with noise ~ U[0, 1) like x.

    `amount` holds one blend factor per image, shape (B,): 0 keeps the image, 1 is pure noise.
    Pass `noise` to control it exactly, or a `generator` (on x's device) to draw it reproducibly.
    """
    if amount.ndim != 1 or amount.shape[0] != x.shape[0]:
        raise ValueError(
            f"amount must have shape (batch,) = ({x.shape[0]},); got {tuple(amount.shape)}"
        )
    if noise is None:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal x shape {tuple(x.shape)}")
    amount = amount.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B,1,1,1)
    return (1 - amount) * x + amount * noise


@torch.no_grad()
def sample_basic(
    model: torch.nn.Module,
    num_steps: int,
    shape: tuple[int, int, int],
    sample_indices: Sequence[int],
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Start from U[0, 1) noise and move 1/(n - i) of the way to the prediction.

    The mix factor grows to 1 at the last step, so the final image is the model's last x0
    prediction. `shape` is (C, H, W) of one image. Sample k's starting noise comes from its own
    generator (`sample_seed(seed, k)`), so an image does not depend on its batch or process.
    Returns float32 NCHW on the CPU, clipped to [0, 1].
    """
    if num_steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1; got {num_steps}")
    if len(shape) != 3:
        raise ValueError(f"shape must be (channels, height, width); got {shape}")
    generators = make_sample_generators(seed, sample_indices)
    x = torch.cat([torch.rand((1, *shape), generator=g) for g in generators]).to(device)
    for i in range(num_steps):
        with model_autocast(device, dtype):
            pred = predict(model, x, 0)
        mix = 1.0 / (num_steps - i)
        x = x * (1 - mix) + pred.float() * mix
    return x.clamp(0.0, 1.0).cpu()
