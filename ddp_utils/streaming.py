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

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ddp_utils.data import Batches, ImageData, batch_indices, open_image, preprocess

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


def default_num_workers(local_world_size: int) -> int:
    """Cores per local process, at most 8, at least 1 (workers decode PNG/JPEG with PIL)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) // max(1, local_world_size) - 1))


@dataclass
class _Decoder:
    """Picklable per-worker decoding of rows of an HF dataset (image column, decode=False)."""

    dataset: object
    column: str
    resolution: int
    channels: int
    center_crop: bool

    def decode(self, index: int) -> tuple[np.ndarray, list[str]]:
        """The image of row `index`, or of the next readable row; names of the rows skipped."""
        skipped: list[str] = []
        num_rows = len(self.dataset)
        for attempt in range(MAX_REPLACEMENTS):
            row = (index + attempt) % num_rows
            value = self.dataset[row][self.column]
            try:
                image = open_image(value)
                return preprocess(image, self.resolution, self.channels, self.center_crop), skipped
            except Exception as err:  # noqa: BLE001 - malformed files raise all sorts of types
                name = value.get("path") if isinstance(value, dict) else None
                skipped.append(f"{name or f'row {row}'} ({type(err).__name__}: {err})")
        raise ValueError(
            f"{MAX_REPLACEMENTS} consecutive rows from row {index} could not be decoded: "
            f"{skipped[0]} ...; check the dataset"
        )


class _BatchDataset(torch.utils.data.Dataset):
    """Item k is the whole batch of micro-step `start + k` for one rank."""

    def __init__(self, decoder: _Decoder, start: int, batch: int, world: int, rank: int, seed: int):
        self.decoder, self.start = decoder, start
        self.batch, self.world, self.rank, self.seed = batch, world, rank, seed

    def __len__(self) -> int:
        return 2**62  # endless: indexed by micro-step, never iterated to the end

    def __getitem__(self, k: int) -> dict:
        indices = batch_indices(
            self.start + k,
            len(self.decoder.dataset),
            self.batch,
            self.world,
            self.rank,
            self.seed,
        )
        images, skipped = [], []
        for index in indices.tolist():
            image, bad = self.decoder.decode(index)
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
        dataset,
        image_column: str,
        resolution: int,
        channels: int,
        center_crop: bool,
        per_device_batch_size: int,
        accelerator,
        seed: int,
        start_micro_step: int = 0,
        num_workers: int | None = None,
    ) -> None:
        from datasets import Image as ImageFeature

        dataset = dataset.select_columns([image_column]).cast_column(
            image_column, ImageFeature(decode=False)
        )
        decoder = _Decoder(dataset, image_column, resolution, channels, center_crop)
        if num_workers is None:
            num_workers = default_num_workers(
                accelerator.num_processes
                // max(1, getattr(accelerator.state, "num_machines", 1) or 1)
            )
        self.device = accelerator.device
        self.next_micro_step = start_micro_step
        self.seen_skipped: set[str] = set()
        loader = torch.utils.data.DataLoader(
            _BatchDataset(
                decoder,
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
    source = data.stream
    return StreamingBatches(
        source.dataset,
        source.image_column,
        source.resolution,
        source.channels,
        source.center_crop,
        per_device_batch_size,
        accelerator,
        seed,
        start_micro_step,
        num_workers,
    )
