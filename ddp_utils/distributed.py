"""Accelerate setup and the few collective helpers the scripts need.

This module knows nothing about models or diffusion. Everything that may communicate
(`mean_across_ranks`, `gather_chunks`, `map_sharded`) must be called on every rank.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed, str_to_bool
from tqdm.auto import tqdm

from ddp_utils.errors import InputError
from ddp_utils.sharding import Sharding, environment_kept, fsdp_plugin, local, shard_with

T = TypeVar("T")


def prepare_launch() -> list[str]:
    """Set what `accelerate launch` left out on a machine without a GPU, before Accelerate
    reads the environment; returns the warnings to print once.

    accelerate 1.16's multi-process launcher drops a config file's `use_cpu: true` (only its
    single-process launcher exports it as ACCELERATE_USE_CPU), so on a machine without a GPU
    each of the N processes would set itself up alone: N runs fighting over one directory.
    With no GPU, N processes can only mean N CPU processes over gloo: say so to Accelerate.
    """
    if torch.accelerator.is_available():
        return []
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = os.environ.get("ACCELERATE_USE_CPU")
    if world_size > 1 and not str_to_bool(use_cpu or "false"):
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return [
            f"no GPU here: the {world_size} processes run on the CPU over gloo "
            "(ACCELERATE_USE_CPU=true, as a config's `use_cpu: true` means)"
        ]
    if world_size == 1 and use_cpu is not None and not str_to_bool(use_cpu):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return [
            "accelerate launch without --cpu or `use_cpu: true`"
            + (f" (gpu_ids / CUDA_VISIBLE_DEVICES={visible})" if visible else "")
            + ", but torch sees no GPU (no driver, or a CPU build of torch): training on the "
            "CPU, slowly. Check nvidia-smi, or launch a CPU run with `use_cpu: true` or plain "
            "python"
        ]
    return []


def new_accelerator(**kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` for the launcher's processes: the launch prepared as above, and
    refused on every rank (exit 2) when the processes did not find each other."""
    warnings = prepare_launch()
    accelerator = Accelerator(**kwargs)
    for warning in warnings:
        accelerator.print(f"warning: {warning}")
    check_world_size(accelerator.num_processes)
    return accelerator


def check_world_size(num_processes: int) -> None:
    """The launcher's process count (WORLD_SIZE) must be the one Accelerate set up."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != num_processes:
        raise InputError(
            f"the launcher started {world_size} processes but Accelerate set up "
            f"{num_processes} (each process alone, as separate runs): for CPU processes set "
            "ACCELERATE_USE_CPU=true; for GPUs check that every process sees one (nvidia-smi, "
            "CUDA_VISIBLE_DEVICES, the config's gpu_ids)"
        )


def check_shard_groups(num_processes: int, shard_size: int, per_node: bool) -> None:
    """HSDP's groups: at least 2 processes each (else nothing is sharded), whole groups."""
    where = "the processes of one node" if per_node else "--hsdp-shard-size"
    if num_processes > 1 and shard_size < 2:
        raise InputError(
            f"hsdp shards within groups of {where}, {shard_size} here: nothing to shard; use "
            "--sharding fsdp, or --hsdp-shard-size N (N >= 2)",
            "sharding",
        )
    if num_processes % shard_size:
        raise InputError(
            f"{num_processes} processes do not split into groups of {shard_size} ({where})",
            "sharding" if per_node else "hsdp_shard_size",
        )


def local_world_size(default: int = 1) -> int:
    """The number of processes on this node: LOCAL_WORLD_SIZE, which torchrun and accelerate
    launch export; `default` without a launcher."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", default))


def local_share(accelerator: Accelerator | None) -> tuple[int, int]:
    """(r, L): this process is the r-th of the L processes on its node; (0, 1) without an
    accelerator. Node-local work (a cache on the node's disk) is split by these. r >= L where
    a launcher did not export LOCAL_WORLD_SIZE (L is then 1): such a process takes no share."""
    if accelerator is None:
        return 0, 1
    rank = accelerator.local_process_index
    assert accelerator.is_local_main_process == (rank == 0), rank
    return rank, local_world_size()


def make_accelerator(
    mixed_precision: str | None,
    gradient_accumulation_steps: int,
    report_to: str,
    output_dir: str,
    seed: int,
    allow_tf32: bool = True,
    sharding: Sharding = "none",
    fsdp_cpu_offload: bool = False,
    hsdp_shard_size: int | None = None,
) -> Accelerator:
    """One Accelerator for 1..N processes, on CPU or GPU, with reproducible seeding.

    Gradient accumulation is Accelerate's: `accelerator.accumulate(model)` skips the DDP
    all-reduce (FSDP: the reduce-scatter) on the micro-steps that do not update, and
    `accelerator.backward` divides the loss by the number of micro-steps. `sharding` other
    than none: FSDP2 over the processes (`ddp_utils.sharding`), parameters, gradients and
    optimizer state in CPU memory with `fsdp_cpu_offload`; `hsdp`: sharded within groups of
    `hsdp_shard_size` processes (default: one node's), replicated across the groups.
    """
    with environment_kept():
        plugin = None if sharding == "none" else fsdp_plugin(fsdp_cpu_offload)
        accelerator = new_accelerator(
            fsdp_plugin=plugin,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            # TensorBoard is started by ddp_utils.tracking itself (beside a wandb that may fail).
            log_with="wandb" if report_to in ("wandb", "all") else None,
            project_dir=output_dir,
            # The LR is set by hand from the optimizer step (ddp_utils.optim.lr_at): no
            # scheduler whose step count could depend on the number of processes.
            step_scheduler_with_optimizer=False,
        )
    if plugin is not None:
        shard_size = None
        if sharding == "hsdp":
            shard_size = hsdp_shard_size or local_world_size()
            check_shard_groups(accelerator.num_processes, shard_size, hsdp_shard_size is None)
        shard_with(accelerator, plugin, shard_size)
    # None defers to the launcher (`accelerate launch --mixed_precision` or its config file).
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate silently ignores fp16 on CPU (no autocast, no GradScaler): say so.
        accelerator.print("warning: fp16 mixed precision has no effect on CPU; use bf16")
    # Different seeds per rank for anything drawn from the global RNG before training (the
    # loop seeds it per micro-batch); noise and timesteps come from `step_generator`.
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


def micro_batch_position(micro_step: int, num_processes: int, rank: int) -> int:
    """Where a rank's micro-batch sits in the run's stream of per-device batches: micro-step u
    of rank r is the (u * W + r)-th of W processes' (`ddp_utils.data.batches` takes its images
    from there). Noise and dropout are keyed by it too, so a micro-batch gets the same images,
    noise and dropout for any number of processes with the same per-device and global batch:
    one process accumulating two micro-batches trains as two processes do, up to the order of
    the gradients' sums."""
    return micro_step * num_processes + rank


def step_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The generator for all noise drawn for one micro-batch (`micro_batch_position`).

    Re-seeding from (seed, position) instead of drawing from one long-lived stream is what
    makes resume exact: the noise at step k does not depend on how many draws happened
    before, nor on whether the process was restarted in between.
    """
    generator = torch.Generator(device=device)
    # The trailing 0 was the rank when the key was (micro-step, rank): a one-process run's
    # noise is the same under both keys, so its earlier runs resume and reproduce unchanged.
    generator.manual_seed(derive_seed("step", seed, position, 0))
    return generator


def companion_generator(generator: torch.Generator, name: str) -> torch.Generator:
    """A second generator for the same micro-batch, seeded from `generator`'s seed and `name`
    (DreamBooth's class examples draw from it): its draws leave `generator`'s untouched."""
    companion = torch.Generator(device=generator.device)
    companion.manual_seed(derive_seed(name, generator.initial_seed()))
    return companion


def mean_across_ranks(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """Average a tensor of statistics over all ranks (collective: call on every rank)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.detach().float().contiguous(), reduction="mean")


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (one host read for all of them); of a
    DTensor, this process's shard only (`all_finite_everywhere` for all of it)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in map(local, tensors):
        if t.is_floating_point():
            by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def all_finite_everywhere(accelerator: Accelerator, tensors: Iterable[torch.Tensor]) -> bool:
    """`all_finite` of tensors that may be sharded: every process's shards (collective)."""
    finite = all_finite(tensors)
    if accelerator.num_processes == 1:
        return finite
    flag = torch.tensor([0 if finite else 1], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def raise_together(
    accelerator: Accelerator, error: BaseException | None, others: BaseException
) -> None:
    """Raise on every rank if any rank failed (collective), instead of leaving the others to
    wait forever at the next collective. A rank without an error of its own raises `others`
    (which says where to look); a single process just raises its error."""
    if accelerator.num_processes > 1:
        failed = torch.tensor([error is not None], device=accelerator.device).long()
        if accelerator.reduce(failed, reduction="sum").item() and error is None:
            raise others
    if error is not None:
        raise error


def main_process_first(accelerator: Accelerator, work: Callable[[], T], others: BaseException) -> T:
    """`work()` on the main process, then on the others (a download, then reading its cache).
    If it fails on the main process, the others raise `others` (which says where to look)
    instead of waiting for it."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as err:  # re-raised below, on every rank
            error = err
    raise_together(accelerator, error, others)
    return result if accelerator.is_main_process else work()


# --------------------------------------------------------------------------- sharded work
#
# One rule for every job split over processes (training grids, FID features, sample.py,
# evaluate.py): items are cut into chunks of `chunk_size`, and chunk k is done by rank
# k % world_size. A chunk holds the same items whatever the number of processes, so with
# per-item seeding the results are identical on 1 or N processes.


def local_chunks(num_items: int, chunk_size: int, world_size: int, rank: int) -> list[range]:
    """The item ranges this rank works on: chunks rank, rank + world_size, ..."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    num_chunks = -(-num_items // chunk_size)
    return [
        range(k * chunk_size, min((k + 1) * chunk_size, num_items))
        for k in range(rank, num_chunks, world_size)
    ]


_DTYPES = (torch.uint8, torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)
_MAX_DIMS = 6


def gather_chunks(
    accelerator: Accelerator | None, local: list[torch.Tensor], num_items: int, chunk_size: int
) -> torch.Tensor:
    """Every rank's chunk results, in item order, on the CPU of every rank (collective).

    `local[i]` is the result for this rank's i-th chunk of `local_chunks(...)`, first dim the
    chunk's length; all results share one trailing shape and dtype. A rank without chunks
    passes an empty list and learns the shape from the others (no work done to find it).
    """
    world = 1 if accelerator is None else accelerator.num_processes
    if world == 1:
        if not local:
            raise ValueError("nothing to gather: no chunks")
        return torch.cat([t.cpu() for t in local])
    assert accelerator is not None
    device = accelerator.device
    # Trailing shape and dtype: from any rank that has a chunk (a header of a few ints).
    header = torch.full((2 + _MAX_DIMS,), -1, dtype=torch.int64)
    if local:
        sample = local[0]
        if sample.dtype not in _DTYPES or sample.ndim - 1 > _MAX_DIMS:
            raise ValueError(f"cannot gather {sample.dtype} tensors of {sample.ndim} dims")
        header[0], header[1] = _DTYPES.index(sample.dtype), sample.ndim - 1
        header[2 : 2 + sample.ndim - 1] = torch.tensor(sample.shape[1:])
    headers = accelerator.gather(header.to(device)).view(world, -1).cpu()
    known = headers[headers[:, 0] >= 0]
    if len(known) == 0:
        raise ValueError("nothing to gather: no rank has a chunk")
    dtype, ndim = _DTYPES[int(known[0, 0])], int(known[0, 1])
    trailing = tuple(int(d) for d in known[0, 2 : 2 + ndim])
    # Pad every rank to the same number of full chunks, gather once, reorder by chunk.
    num_chunks = -(-num_items // chunk_size)
    num_slots = -(-num_chunks // world)
    buffer = torch.zeros((num_slots, chunk_size, *trailing), dtype=dtype, device=device)
    for slot, result in enumerate(local):
        buffer[slot, : len(result)] = result.to(device)
    gathered = accelerator.gather(buffer).view(world, num_slots, chunk_size, *trailing).cpu()
    parts = []
    for k in range(num_chunks):
        size = min(chunk_size, num_items - k * chunk_size)
        parts.append(gathered[k % world, k // world, :size])
    return torch.cat(parts)


def map_sharded(
    accelerator: Accelerator | None,
    num_items: int,
    chunk_size: int,
    fn: Callable[[range], torch.Tensor],
    progress: str | None = None,
) -> torch.Tensor:
    """`fn(items)` over this rank's chunks, all results gathered in item order (collective).

    `progress` names a progress bar on the main process (images done across all ranks,
    counted as the main process's share times the number of processes; images/s)."""
    world = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    chunks = local_chunks(num_items, chunk_size, world, rank)
    bar = None
    if progress and (accelerator is None or accelerator.is_main_process):
        bar = tqdm(total=num_items, desc=progress, unit="img", dynamic_ncols=True, mininterval=1.0)
    results = []
    for items in chunks:
        results.append(fn(items))
        if bar is not None:
            bar.update(min(len(items) * world, num_items - bar.n))
    if bar is not None:
        bar.close()
    return gather_chunks(accelerator, results, num_items, chunk_size)
