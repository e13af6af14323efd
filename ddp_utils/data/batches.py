"""Which images each rank trains on at each micro-step, delivered on the device as floats.

The order is a pure function of (seed, micro-step, rank) (`batch_indices`): the data stream is
the concatenation of per-epoch permutations, micro-step u takes the global slice [u*G, (u+1)*G)
with G the global micro-batch, and rank r the r-th per-device part of it. Nothing depends on a
restart or on a sampler's hidden state, so resume is exact and costs nothing (no
`skip_first_batches` replay), and the global batch at a step is the same set of images for any
number of processes with the same global batch size.

Two sources serve these batches, bit for bit the same on datasets without bad files:
- `MemoryBatches`: the decoded dataset sits on the device; a batch is one gather.
- `StreamingBatches`: DataLoader workers decode each batch's rows a few batches ahead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import torch
from accelerate import Accelerator

from ddp_utils.data.decode import decode_row, raw_images
from ddp_utils.data.latent_cache import LatentData
from ddp_utils.data.load import ImageData, StreamSource
from ddp_utils.distributed import companion_generator, derive_seed, local_world_size
from ddp_utils.errors import InputError

logger = logging.getLogger("ddp_diffusion")


@lru_cache(maxsize=4)  # a batch straddles at most two epochs; randperm(1.3M) costs ~10 ms
def epoch_permutation(seed: int, epoch: int, num_images: int) -> torch.Tensor:
    """The order of the images in `epoch`: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed("epoch", seed, epoch))
    return torch.randperm(num_images, generator=generator)


def batch_indices(
    micro_step: int,
    num_images: int,
    per_device_batch_size: int,
    world_size: int,
    rank: int,
    seed: int,
    permutation: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Indices of the images that `rank` trains on at `micro_step` (may straddle two epochs).

    `permutation(epoch)` gives an epoch's order (default: `epoch_permutation` on the CPU); the
    indices are on its device.
    """
    if permutation is None:
        permutation = partial(epoch_permutation, seed, num_images=num_images)
    global_batch = per_device_batch_size * world_size
    start = micro_step * global_batch + rank * per_device_batch_size
    stop = start + per_device_batch_size
    # Positions [start, stop) of the stream, epoch by epoch: integer arithmetic and slices
    # only, so building a batch never reads a tensor value on the host.
    parts = []
    for epoch in range(start // num_images, (stop - 1) // num_images + 1):
        low, high = max(start, epoch * num_images), min(stop, (epoch + 1) * num_images)
        offset = epoch * num_images
        parts.append(permutation(epoch)[low - offset : high - offset])
    return torch.cat(parts)


def to_float(
    batch: torch.Tensor, value_range: tuple[float, float], flip_generator: torch.Generator | None
) -> torch.Tensor:
    """uint8 (B,C,H,W) -> float in `value_range`, random horizontal flip on the device."""
    low, high = value_range
    if flip_generator is not None:
        # Flip the uint8 batch (4x less memory traffic than flipping floats).
        flip = torch.rand(batch.shape[0], generator=flip_generator, device=batch.device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    # One float copy, scaled in place: no temporaries (this runs every micro-step).
    return batch.to(torch.float32, copy=True).mul_((high - low) / 255.0).add_(low)


@dataclass
class Batch:
    """One rank's micro-batch, on its device."""

    images: torch.Tensor  # float (B, C, H, W) in the method's value range
    # Each image's condition: batch-first tensors by the network input they feed (the class
    # id of a labelled dataset: class_labels); None when the data has none. The loop and the
    # batch sources carry it without looking inside (diffusion.conditioning reads it).
    condition: dict[str, torch.Tensor] | None = None
    # DreamBooth's prior preservation: as many class examples, drawn (with the method's draws
    # for them: noise, timesteps, captions) from their own generator, so that the examples
    # above are drawn as they would be without them.
    prior: Batch | None = None
    prior_generator: torch.Generator | None = None


def row_condition(
    labels: torch.Tensor | None, name: str = "class_labels"
) -> dict[str, torch.Tensor] | None:
    """The condition of rows whose labels are `labels` (None: unlabelled data): their classes,
    or for text their rows among the captions (`name`: `ImageData.condition_name`)."""
    return None if labels is None else {name: labels}


class BatchSource:
    """Endless batches for one rank: `get(micro_step, generator)` for consecutive micro-steps.

    The flip (if any) is drawn first from `generator`, the generator of that micro-step on this
    rank; the method then draws its noise from the same generator.
    """

    def __init__(
        self,
        per_device_batch_size: int,
        accelerator: Accelerator,
        seed: int,
        value_range: tuple[float, float],
        random_flip: bool,
    ) -> None:
        self.per_device_batch_size = per_device_batch_size
        self.world_size = accelerator.num_processes
        self.rank = accelerator.process_index
        self.device = accelerator.device
        self.seed = seed
        self.value_range = value_range
        self.random_flip = random_flip

    def warn_if_smaller_than_a_batch(self, num_images: int) -> None:
        global_batch = self.per_device_batch_size * self.world_size
        if num_images < global_batch:
            logger.warning(
                "the dataset (%d images) is smaller than one global batch (%d): "
                "images repeat within a batch",
                num_images,
                global_batch,
            )

    def indices(self, micro_step: int, num_images: int) -> torch.Tensor:
        return batch_indices(
            micro_step,
            num_images,
            self.per_device_batch_size,
            self.world_size,
            self.rank,
            self.seed,
        )

    def fetch(self, micro_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The uint8 images (and their condition) of `micro_step`, on the device."""
        raise NotImplementedError

    def uint8_images(self, micro_step: int) -> torch.Tensor:
        return self.fetch(micro_step)[0]

    def get(self, micro_step: int, generator: torch.Generator) -> Batch:
        images, condition = self.fetch(micro_step)
        flip_generator = generator if self.random_flip else None
        return Batch(to_float(images, self.value_range, flip_generator), condition)


class MemoryBatches(BatchSource):
    """The whole decoded dataset on the training device (CIFAR-10 at 32x32 is 150 MB), so a
    batch costs one gather on the device: no PIL, no workers, no host copy."""

    def __init__(self, data: ImageData, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.warn_if_smaller_than_a_batch(data.num_images)
        self.images = data.images.to(self.device)
        self.num_images = int(self.images.shape[0])
        self.labels = None if data.labels is None else data.labels.to(self.device)
        self.condition_name = data.condition_name
        self._orders: dict[int, torch.Tensor] = {}  # epoch -> its permutation on the device

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """`epoch_permutation` on the device, copied once per epoch (not once per batch).

        On a GPU a copy from pageable host memory waits for every kernel queued before it,
        which would stop the host from running ahead of the device at every step. The order
        goes through pinned memory instead, asynchronously, once per epoch.
        """
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_permutation(self.seed, epoch, self.num_images)
            if self.device.type == "cuda":
                order = order.pin_memory()
            order = order.to(self.device, non_blocking=True)
            # A batch straddles at most two epochs: keep the previous one, drop older ones.
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = order
        return order

    def indices(self, micro_step: int, num_images: int) -> torch.Tensor:
        return batch_indices(
            micro_step,
            num_images,
            self.per_device_batch_size,
            self.world_size,
            self.rank,
            self.seed,
            self.epoch_order,
        )

    def fetch(self, micro_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        index = self.indices(micro_step, self.images.shape[0])  # on the device already
        return self.images[index], row_condition(
            None if self.labels is None else self.labels[index], self.condition_name
        )


class _BatchDataset(torch.utils.data.Dataset):
    """Item k is the whole uint8 batch of micro-step `start + k` for one rank."""

    def __init__(self, source: StreamSource, start: int, batches: BatchSource) -> None:
        self.source, self.start, self.batches = source, start, batches

    def __len__(self) -> int:
        return 2**62  # endless: indexed by micro-step, never iterated to the end

    def __getitem__(self, k: int) -> dict:
        source = self.source
        indices = self.batches.indices(self.start + k, len(source.dataset))
        images, rows, skipped = [], [], []
        for index in indices.tolist():
            image, bad, row = decode_row(
                source.dataset,
                source.image_column,
                index,
                source.resolution,
                source.channels,
                source.center_crop,
            )
            images.append(image)
            rows.append(row)
            skipped.extend(bad)
        # Contiguous NCHW like the in-memory path (preprocess returns a transposed view, and a
        # channels-last batch would pick other conv kernels: not bit-identical).
        batch = np.ascontiguousarray(np.stack(images))
        item = {"images": torch.from_numpy(batch), "skipped": skipped}
        if source.labels is not None:
            item["labels"] = source.labels[torch.tensor(rows)]
        return item


class _Sequential(torch.utils.data.Sampler):
    def __iter__(self) -> Iterator[int]:
        k = 0
        while True:
            yield k
            k += 1


def default_num_workers(num_local_processes: int) -> int:
    """Cores per local process minus one for the training process, between 1 and 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) // max(1, num_local_processes) - 1))


class StreamingBatches(BatchSource):
    """Batches decoded by DataLoader workers from micro-step `start_micro_step` on.

    A row that cannot be decoded is replaced by the next readable row (deterministically, so
    resume stays exact) and named once in the log; the in-memory path drops such rows instead.
    """

    def __init__(
        self,
        source: StreamSource,
        *args,
        start_micro_step: int = 0,
        num_workers: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        # Raw bytes/paths: workers decode with the in-memory path's own functions.
        source = StreamSource(
            raw_images(source.dataset, source.image_column),
            source.image_column,
            source.resolution,
            source.channels,
            source.center_crop,
            source.labels,
            source.condition_name,
        )
        if num_workers is None:
            # The processes sharing this node's cores.
            num_workers = default_num_workers(local_world_size(self.world_size))
        self.next_micro_step = start_micro_step
        self.condition_name = source.condition_name
        self.seen_skipped: set[str] = set()
        loader = torch.utils.data.DataLoader(
            _BatchDataset(source, start_micro_step, self),
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
            len(source.dataset),
            num_workers,
        )

    def fetch(self, micro_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
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
        labels = item.get("labels")
        return (
            item["images"].to(self.device, non_blocking=True),
            row_condition(
                None if labels is None else labels.to(self.device, non_blocking=True),
                self.condition_name,
            ),
        )


def make_batches(
    data: ImageData,
    per_device_batch_size: int,
    accelerator: Accelerator,
    seed: int,
    value_range: tuple[float, float],
    random_flip: bool,
    start_micro_step: int = 0,
    num_workers: int | None = None,
) -> BatchSource:
    """The batch source a training loop reads from: in memory, or streamed when `data` says so."""
    common = (per_device_batch_size, accelerator, seed, value_range, random_flip)
    if data.stream is None:
        return MemoryBatches(data, *common)
    return StreamingBatches(
        data.stream, *common, start_micro_step=start_micro_step, num_workers=num_workers
    )


class LatentBatches(BatchSource):
    """Batches of latents: each batch's rows gathered on the host from the mapped cache (only
    those pages are read), converted to float32 and copied to the device (through pinned
    memory on a GPU, without waiting for it), then z = (mean + std * eps - shift) * scale with
    the micro-step's generator; the condition is the latents' rows' (`LatentData.labels`). The
    pixels stay on the host (`ImageData.images`, of a streamed dataset its first rows only:
    grids of real data, the FID reference).

    With `prior` (DreamBooth's class images' latents), each batch also carries as many class
    examples (`Batch.prior`): their rows in their own order (a pure function of the seed and
    micro-step, as the images'), drawn with `companion_generator(generator, "prior")`."""

    def __init__(self, latents: LatentData, *args, prior: LatentData | None = None,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.latents, self.prior = latents, prior
        self.num_images = len(latents.mean)
        if self.random_flip:
            assert latents.flipped_mean is not None, "flips need the mirror images' latents"
        self.warn_if_smaller_than_a_batch(self.num_images)

    def to_device(self, rows: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def gather(self, latents: LatentData, array: np.ndarray, index: np.ndarray) -> torch.Tensor:
        """Rows `index` of a mapped array, float32, on the device. Rows holding NaN/inf (a
        cache damaged on disk after it was written, too large to be checked when read) are
        refused here, naming the cache, before they could pass for a diverged run."""
        rows = np.asarray(array[index], dtype=np.float32)
        finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
        if not finite.all():
            name = next(
                (f"{n}.npy" for n in ("mean", "std", "flipped_mean", "flipped_std")
                 if getattr(latents, n) is array), "an array"
            )  # fmt: skip
            raise InputError(
                f"the latent cache {latents.folder} holds non-finite values (NaN/inf) in {name}, "
                f"row {int(index[np.argmin(finite)])}: it was damaged on disk after it was "
                f"written. Delete {latents.folder} and run the same command again (it is "
                "encoded anew)"
            )
        return self.to_device(torch.from_numpy(rows))

    def draw(self, latents: LatentData, rows: torch.Tensor, generator: torch.Generator) -> Batch:
        """The batch of `rows` of `latents`: the flip, then the posterior sample."""
        index = rows.numpy()
        mean = self.gather(latents, latents.mean, index)
        std = self.gather(latents, latents.std, index)
        if self.random_flip:  # drawn first, as the pixel path's flip
            flip = torch.rand(len(index), generator=generator, device=self.device) < 0.5
            flip = flip[:, None, None, None]
            mean = torch.where(flip, self.gather(latents, latents.flipped_mean, index), mean)
            std = torch.where(flip, self.gather(latents, latents.flipped_std, index), std)
        eps = torch.randn(mean.shape, generator=generator, device=self.device)
        z = (mean + std * eps - latents.shift) * latents.scale
        labels = None if latents.labels is None else self.to_device(latents.labels[rows])
        return Batch(z, row_condition(labels, latents.condition_name))

    def get(self, micro_step: int, generator: torch.Generator) -> Batch:
        rows = self.indices(micro_step, self.num_images)  # the pixel path's order, on the CPU
        batch = self.draw(self.latents, rows, generator)
        if self.prior is not None:
            prior_rows = batch_indices(
                micro_step, len(self.prior.mean), self.per_device_batch_size, self.world_size,
                self.rank, derive_seed("prior", self.seed),
            )  # fmt: skip
            batch.prior_generator = companion_generator(generator, "prior")
            batch.prior = self.draw(self.prior, prior_rows, batch.prior_generator)
        return batch
