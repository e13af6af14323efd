"""The streaming data path, for datasets too large to decode into memory.

`StreamingBatches` serves the same batches as `ddp_utils.data.Batches` (the same
`batch_indices(seed, micro_step, rank)` order, the same decoding and resizing), but decodes them
on the fly in DataLoader worker processes, a few batches ahead of the training step. Resuming at
micro-step k starts the sampler at k: nothing is skipped by reading and discarding batches.

A row that cannot be decoded is replaced by the next readable row (deterministically, so resume
stays exact), and named once in the log. The in-memory path drops such rows instead: the two
paths agree exactly on datasets without bad files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from ddp_utils.data import (
    Batches,
    ImageData,
    StreamSource,
    batch_indices,
    open_image,
    preprocess,
)

logger = logging.getLogger("ddp_diffusion")

# Decoded uint8 size above which `--data-loading auto` streams instead of decoding to memory
# (CIFAR-10 at 32x32 is 150 MB; ImageNet at 64x64 is 15.7 GB).
MEMORY_LIMIT_BYTES = 4 * 2**30
MAX_REPLACEMENTS = 64  # consecutive unreadable rows before giving up on a batch


def decoded_bytes(num_rows: int, resolution: int, channels: int) -> int:
    return num_rows * channels * resolution * resolution


def choose_data_loading(mode: str, num_rows: int, resolution: int, channels: int) -> str:
    """`memory` or `stream` for `--data-loading auto|memory|stream`."""
    if mode not in ("auto", "memory", "stream"):
        raise ValueError(f"--data-loading must be auto, memory or stream; got {mode!r}")
    if mode != "auto":
        return mode
    size = decoded_bytes(num_rows, resolution, channels)
    return "memory" if size <= MEMORY_LIMIT_BYTES else "stream"


def default_num_workers(num_local_processes: int) -> int:
    """Cores per local process minus one for the training process, between 1 and 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) // max(1, num_local_processes) - 1))


def decode_row(source: StreamSource, index: int) -> tuple[np.ndarray, list[str]]:
    """The image of row `index`, or of the next readable row; names of the rows skipped."""
    skipped: list[str] = []
    num_rows = len(source.dataset)
    for attempt in range(MAX_REPLACEMENTS):
        row = (index + attempt) % num_rows
        value = source.dataset[row][source.image_column]
        try:
            image = open_image(value)
            array = preprocess(image, source.resolution, source.channels, source.center_crop)
            return array, skipped
        except Exception as err:  # noqa: BLE001 - malformed files raise all sorts of types
            name = value.get("path") if isinstance(value, dict) else None
            skipped.append(f"{name or f'row {row}'} ({type(err).__name__}: {err})")
    raise ValueError(
        f"{MAX_REPLACEMENTS} consecutive rows from row {index} could not be decoded: "
        f"{skipped[0]} ...; check the dataset"
    )


class _BatchDataset(torch.utils.data.Dataset):
    """Item k is the whole batch of micro-step `start + k` for one rank."""

    def __init__(
        self, source: StreamSource, start: int, batch: int, world: int, rank: int, seed: int
    ):
        self.source, self.start = source, start
        self.batch, self.world, self.rank, self.seed = batch, world, rank, seed

    def __len__(self) -> int:
        return 2**62  # endless: indexed by micro-step, never iterated to the end

    def __getitem__(self, k: int) -> dict:
        num_rows = len(self.source.dataset)
        indices = batch_indices(
            self.start + k, num_rows, self.batch, self.world, self.rank, self.seed
        )
        images, skipped = [], []
        for index in indices.tolist():
            image, bad = decode_row(self.source, index)
            images.append(image)
            skipped.extend(bad)
        # Contiguous NCHW like the in-memory path (preprocess returns a transposed view, and a
        # channels-last batch would pick other conv kernels: not bit-identical).
        batch = np.ascontiguousarray(np.stack(images))
        return {"images": torch.from_numpy(batch), "skipped": skipped}


class _Sequential(torch.utils.data.Sampler):
    def __iter__(self) -> Iterator[int]:
        k = 0
        while True:
            yield k
            k += 1


class StreamingBatches:
    """Endless uint8 batches for one rank from micro-step `start_micro_step` on, decoded by workers.

    `get(micro_step)` must be called with consecutive micro-steps, as the training loop does.
    """

    def __init__(
        self,
        source: StreamSource,
        per_device_batch_size: int,
        accelerator,
        seed: int,
        start_micro_step: int = 0,
        num_workers: int | None = None,
    ) -> None:
        from datasets import Image as ImageFeature

        # Raw bytes/paths: workers decode with the in-memory path's own open_image/preprocess.
        dataset = source.dataset.select_columns([source.image_column]).cast_column(
            source.image_column, ImageFeature(decode=False)
        )
        source = dataclasses.replace(source, dataset=dataset)
        if num_workers is None:
            # torchrun/accelerate export LOCAL_WORLD_SIZE: the processes sharing this node's cores.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
            num_workers = default_num_workers(local)
        self.device = accelerator.device
        self.next_micro_step = start_micro_step
        self.seen_skipped: set[str] = set()
        loader = torch.utils.data.DataLoader(
            _BatchDataset(
                source,
                start_micro_step,
                per_device_batch_size,
                accelerator.num_processes,
                accelerator.process_index,
                seed,
            ),
            batch_size=None,  # items are whole batches already
            sampler=_Sequential(),
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if num_workers > 0 else None,
            persistent_workers=num_workers > 0,
        )
        self.iterator = iter(loader)
        logger.info(
            "streaming data: %d rows decoded on the fly by %d worker(s) per process",
            len(dataset),
            num_workers,
        )

    def get(self, micro_step: int) -> torch.Tensor:
        if micro_step != self.next_micro_step:
            raise RuntimeError(
                f"StreamingBatches serves consecutive micro-steps: expected "
                f"{self.next_micro_step}, asked for {micro_step}"
            )
        self.next_micro_step += 1
        item = next(self.iterator)
        new = [name for name in item["skipped"] if name not in self.seen_skipped]
        if new:
            self.seen_skipped.update(new)
            logger.warning(
                "replaced %d unreadable image(s) by the next readable row:\n  %s",
                len(new),
                "\n  ".join(new),
            )
        return item["images"].to(self.device, non_blocking=True)


def make_batches(
    data: ImageData,
    per_device_batch_size: int,
    accelerator,
    seed: int,
    start_micro_step: int,
    num_workers: int | None = None,
) -> Batches | StreamingBatches:
    """The batch source a training loop reads from: in memory, or streamed when `data` says so."""
    if data.stream is None:
        return Batches(data, per_device_batch_size, accelerator, seed)
    return StreamingBatches(
        data.stream, per_device_batch_size, accelerator, seed, start_micro_step, num_workers
    )
