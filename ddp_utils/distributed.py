"""Accelerate setup and the few collective helpers the scripts need.

This module knows nothing about models or diffusion. Everything that may communicate
(`mean_across_ranks`, `all_true`) must be called on every rank.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed


def make_accelerator(
    mixed_precision: str | None,
    gradient_accumulation_steps: int,
    report_to: str,
    output_dir: str,
    seed: int,
    allow_tf32: bool = True,
) -> Accelerator:
    """One Accelerator for 1..N processes, on CPU or GPU, with reproducible seeding.

    Gradient accumulation is Accelerate's: `accelerator.accumulate(model)` skips the DDP
    all-reduce on the micro-steps that do not update, and `accelerator.backward` divides
    the loss by the number of micro-steps.
    """
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with="wandb" if report_to == "wandb" else None,
        project_dir=output_dir,
        # The LR is set by hand from the optimizer step (ddp_utils.optim.lr_at): no
        # scheduler whose step count could depend on the number of processes.
        step_scheduler_with_optimizer=False,
    )
    # None defers to the launcher (`accelerate launch --mixed_precision` or its config file).
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate silently ignores fp16 on CPU (no autocast, no GradScaler): say so.
        accelerator.print("warning: --mixed-precision fp16 has no effect on CPU; use bf16")
    # Different seeds per rank for anything drawn from the global RNG (e.g. dropout);
    # noise and timesteps come from `step_generator` instead.
    set_seed(seed + accelerator.process_index)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.backends.cudnn.benchmark = True
    return accelerator


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across runs and machines."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator for all noise drawn at one (micro-)step on one rank.

    Re-seeding from (seed, step, rank) instead of drawing from one long-lived stream is
    what makes resume exact: the noise at step k does not depend on how many draws
    happened before, nor on whether the process was restarted in between.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed("step", seed, step, rank))
    return generator


def mean_across_ranks(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """Average a tensor of statistics over all ranks (collective: call on every rank)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.detach().float().contiguous(), reduction="mean")


def all_true(accelerator: Accelerator, flag: bool) -> bool:
    """True only when `flag` is true on every rank (collective: call on every rank)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() == accelerator.num_processes)


def any_true(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` is true on at least one rank (collective: call on every rank)."""
    return not all_true(accelerator, not flag)


def world_info(accelerator: Accelerator) -> dict[str, Any]:
    """What a user wants to see at start: who runs where."""
    return {
        "num_processes": accelerator.num_processes,
        "num_machines": int(
            os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("GROUP_WORLD_SIZE", 1))
        ),
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
    }


def generate_sharded(
    accelerator: Accelerator,
    num_items: int,
    batch_size: int,
    make_chunk: Callable[[list[int]], torch.Tensor],
) -> torch.Tensor:
    """Run `make_chunk(indices)` over `range(num_items)` on all ranks; return all outputs.

    Chunk k (items [k*B, (k+1)*B)) is made by rank k % world_size, so each chunk has the
    same composition whatever the number of processes: with per-item seeding the result is
    identical for 1 or N processes. Every rank receives the full result in item order
    (collective: call on every rank). `make_chunk` returns a tensor whose first dim is
    len(indices).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    num_chunks = math.ceil(num_items / batch_size)
    outputs: list[torch.Tensor] = []
    for first in range(0, num_chunks, world):
        chunk = first + rank
        indices = list(range(chunk * batch_size, min((chunk + 1) * batch_size, num_items)))
        local = make_chunk(indices) if indices else None
        if world == 1:
            outputs.append(local)
            continue
        # Pad to a full chunk so every rank contributes the same shape to the gather.
        if local is None:
            local = make_chunk([0])[:0]
        padded = torch.zeros((batch_size, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: len(local)] = local
        gathered = accelerator.gather(padded.to(accelerator.device)).reshape(
            world, batch_size, *local.shape[1:]
        )
        for offset in range(world):
            c = first + offset
            size = max(0, min(batch_size, num_items - c * batch_size))
            if size:
                outputs.append(gathered[offset, :size].cpu())
    return torch.cat([o.cpu() for o in outputs])
