"""Optimizer construction and the learning-rate schedule as a pure function of the step.

The LR is computed from the optimizer step (not from per-process batches, nor from a
scheduler object with hidden state), so it is the same for 1 or N processes at the same
global batch and needs nothing saved to resume.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"--lr-schedule must be constant or cosine, got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(
    name: str,
    params,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    """Adam (the seed's section 1) or AdamW (section 2); fused kernels on CUDA."""
    kwargs = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
    if device.type == "cuda":
        kwargs["fused"] = True
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"--optimizer must be adam or adamw, got {name!r}")
