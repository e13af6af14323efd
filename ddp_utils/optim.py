"""Optimizer construction and the learning-rate schedule as a pure function of the step.

The LR is computed from the optimizer step (not from per-process batches, nor from a
scheduler object with hidden state), so it is the same for 1 or N processes at the same
global batch and needs nothing saved to resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch


def lr_at(
    step: int,
    base_lr: float,
    warmup_steps: int,
    max_steps: int,
    schedule: Literal["constant", "cosine"],
) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(
    name: Literal["adam", "adamw"],
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """Adam or AdamW with the fused kernel (CPU and CUDA): one kernel for all parameters, and
    a `found_inf` input that lets `ddp_utils.guard.guarded_step` skip a step on the device."""
    kwargs = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "fused": True}
    optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer_class(params, **kwargs)
