"""A dataset, decoded once: `load_image_data` turns a `dataset` name into uint8 images.

In memory (the default for anything up to 4 GiB decoded): the local main process of each node
decodes every image once and writes a cache keyed by the source's fingerprint and the decode
settings; the other processes wait, then everyone reads it, and training gathers batches from
one uint8 tensor on the device. Streamed (larger sets): only the first rows are decoded here
(for previews and evaluation references); `ddp_utils.data.batches` decodes the rest per batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from accelerate import Accelerator

from ddp_utils.data.captions import Captions, one_caption, read_captions
from ddp_utils.data.decode import (
    CACHE_VERSION,
    cache_fix,
    common_shape,
    decode_all,
    default_cache_dir,
    read_cache,
    write_cache,
)
from ddp_utils.data.source import (
    DIGITS_CHANNELS,
    DIGITS_RESOLUTION,
    Source,
    detect_image_column,
    detect_label_column,
    is_built_in,
    load_source,
)
from ddp_utils.errors import InputError

logger = logging.getLogger("ddp_diffusion")

DataLoading = Literal["auto", "memory", "stream"]

CAPTION_ROWS = "caption_rows"  # a text-conditional batch's condition: its images' caption rows
# Decoded uint8 size above which `auto` streams instead of decoding to memory
# (CIFAR-10 at 32x32 is 150 MB; ImageNet at 64x64 is 15.7 GB).
MEMORY_LIMIT_BYTES = 4 * 2**30
STREAM_PREVIEW_ROWS = 1024  # rows decoded up front in stream mode (previews, FID reference)


@dataclass
class StreamSource:
    """An HF dataset and how to decode its rows, for the streaming path."""

    dataset: Any
    image_column: str
    resolution: int
    channels: int
    center_crop: bool
    # Every row's class id (int64), when training on them; its row of the captions, for text.
    labels: torch.Tensor | None = None
    condition_name: str = "class_labels"  # the name batches give `labels` in their condition


@dataclass
class ImageData:
    """A decoded dataset: uint8 images (N, C, H, W) plus where they came from."""

    images: torch.Tensor
    fingerprint: str
    source: str
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    num_upscaled: int = 0  # images smaller than the resolution, upscaled to it
    # Streaming: the rows to decode per batch; `images` then holds only the first rows.
    stream: StreamSource | None = None
    # int64 (N,), per image in `images`: its class (class-conditional), or its source row
    # in `captions` (text-conditional); batches carry it as their condition (`condition_name`).
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    captions: Captions | None = None  # every source row's captions (text-conditional)

    @property
    def condition_name(self) -> str:
        """The name batches give `labels` in their condition."""
        return "class_labels" if self.captions is None else CAPTION_ROWS

    @property
    def num_classes(self) -> int:
        return 0 if self.class_names is None else len(self.class_names)

    @property
    def num_images(self) -> int:
        if self.stream is not None:
            return len(self.stream.dataset)
        return int(self.images.shape[0])


def decoded_bytes(num_rows: int, resolution: int, channels: int) -> int:
    return num_rows * channels * resolution * resolution


def memory_bytes(accelerator: Accelerator | None) -> int:
    """Memory of the training device: the GPU's, else this machine's RAM."""
    if accelerator is not None and accelerator.device.type == "cuda":
        return torch.cuda.get_device_properties(accelerator.device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(
    num_rows: int,
    resolution: int,
    channels: int,
    batch_size: int,
    mode: str,
    memory: int,
) -> None:
    """Refuse sizes that cannot fit before allocating anything (an 8x8 digit upscaled to
    100000x100000 is 10 GB), naming what would fit instead."""
    gib = 2**30
    image = decoded_bytes(1, resolution, channels)
    batch = batch_size * image * 5  # the uint8 batch and its float32 copy
    if batch > memory // 2:
        raise InputError(
            f"one batch of {batch_size} images at {resolution}x{resolution} needs "
            f"{batch / gib:,.1f} GiB, more than half of the {memory / gib:,.1f} GiB this device "
            "has: lower the resolution or the batch size",
            "resolution",
        )
    total = decoded_bytes(num_rows, resolution, channels)
    if mode == "memory" and total > memory // 2:
        raise InputError(
            f"{num_rows:,} images decoded at {resolution}x{resolution} take {total / gib:,.1f} "
            f"GiB, more than half of the {memory / gib:,.1f} GiB here: use --data-loading "
            "stream (decodes each batch on the fly) or a lower resolution",
            "data_loading",
        )


def choose_data_loading(mode: DataLoading, num_rows: int, resolution: int, channels: int) -> str:
    """`memory` or `stream` for `auto|memory|stream`."""
    if mode != "auto":
        return mode
    size = decoded_bytes(num_rows, resolution, channels)
    return "memory" if size <= MEMORY_LIMIT_BYTES else "stream"


def load_image_data(
    dataset: str,
    resolution: int | None,
    channels: int | None,
    dataset_config: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    center_crop: bool = True,
    max_images: int | None = None,
    cache_dir: Path | None = None,
    accelerator: Accelerator | None = None,
    data_loading: DataLoading = "memory",
    batch_size: int = 1,
    with_labels: bool = False,
    label_column: str | None = None,
    with_captions: bool = False,
    caption_column: str | None = None,
    instance_prompt: str | None = None,
) -> ImageData:
    """Load, validate and decode a dataset once per node (collective-safe: see the module doc).

    `batch_size` (per device) only serves the check that a batch fits in memory. With
    `with_labels`, the class of every image comes along (`label_column`, else the dataset's
    one ClassLabel column), and a dataset without labels is an error. With `with_captions`,
    every row's captions (`caption_column`, else detected: `ddp_utils.data.captions`), or
    `instance_prompt` for every row whatever the data holds (DreamBooth's); each image's
    condition is then its row among them.

    `resolution` / `channels` None: the images' most common size and mode (logged); the
    decoded images' shape says what was chosen.
    """
    if channels is not None and channels not in (1, 3):
        raise InputError(f"must be 1 or 3, got {channels}", "channels")
    if resolution is not None and resolution < 4:
        raise InputError(f"must be at least 4, got {resolution}", "resolution")
    source = load_source(dataset, dataset_config, split)
    ds = source.dataset
    if len(ds) == 0:
        raise InputError(f"the dataset is empty ({source.description})", "dataset")
    column = detect_image_column(ds, image_column)
    if max_images is not None:
        ds = ds.select(range(min(max_images, len(ds))))
    if resolution is None or channels is None:
        # Nothing readable: decoding says so, naming the files.
        shape = _shape_from_images(ds, column, source, resolution, channels)
        resolution, channels = shape or (resolution or source.resolution or 32, channels or 3)
    assert not (with_labels and with_captions), "a model is conditioned on classes or on text"
    row_labels, class_names = _read_labels(ds, label_column) if with_labels else (None, None)
    captions = None
    if with_captions:
        assert instance_prompt is None or caption_column is None, "the config refuses both"
        captions = (
            read_captions(ds, caption_column)
            if instance_prompt is None
            else one_caption(len(ds), instance_prompt)
        )
    if captions is not None:  # an image's condition: its row's captions
        row_labels = torch.arange(len(ds), dtype=torch.int64)
    key = {
        "version": CACHE_VERSION,
        "fingerprint": source.fingerprint,
        "column": column,
        "resolution": resolution,
        "channels": channels,
        "center_crop": center_crop,
        "num_rows": len(ds),
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    condition_name = "class_labels" if captions is None else CAPTION_ROWS
    stream = StreamSource(ds, column, resolution, channels, center_crop, row_labels, condition_name)
    mode = choose_data_loading(data_loading, len(ds), resolution, channels)
    check_fits(len(ds), resolution, channels, batch_size, mode, memory_bytes(accelerator))
    if mode == "stream":
        data = _stream_preview(stream, fingerprint, source)
        data.class_names, data.captions = class_names, captions
        return data
    cache_file = (default_cache_dir() if cache_dir is None else cache_dir) / (
        f"images-{fingerprint}.npz"
    )

    def build() -> tuple | None:
        """Decode into the cache; the decode itself when the cache cannot be written."""
        if read_cache(cache_file, fingerprint) is not None:
            return None
        decoded = decode_all(ds, column, resolution, channels, center_crop)
        try:
            write_cache(cache_file, fingerprint, *decoded)
        except OSError as err:  # full or read-only: the cache is a saving, not a need
            logger.warning(
                "could not write the decoded-image cache %s (%s): going on without it, so "
                "every run (and every process) decodes the images itself; to keep it, %s",
                cache_file, err.strerror or err, cache_fix(),
            )  # fmt: skip
            return decoded
        return None

    decoded = None
    if accelerator is None:
        decoded = build()
    else:
        with accelerator.local_main_process_first():
            if accelerator.is_local_main_process:
                decoded = build()
    cached = decoded or read_cache(cache_file, fingerprint)
    if cached is None:  # the local main process could not write it (and said so)
        cached = decode_all(ds, column, resolution, channels, center_crop)
    images, skipped, num_upscaled, rows = cached
    _report(skipped, num_upscaled, resolution)
    if len(images) == 0:
        raise InputError(
            f"none of the {len(ds)} images could be read ({source.description}): "
            + first_errors(skipped),
            "dataset",
        )
    return ImageData(
        images=torch.from_numpy(images),
        fingerprint=fingerprint,
        source=source.description,
        num_skipped=len(skipped),
        skipped=skipped,
        num_upscaled=num_upscaled,
        labels=None if row_labels is None else row_labels[torch.from_numpy(rows)],
        class_names=class_names,
        captions=captions,
    )


def peek_image_size(
    dataset: str,
    resolution: int | None,
    channels: int | None,
    dataset_config: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    max_images: int | None = None,
) -> tuple[int, int] | None:
    """The (resolution, channels) `load_image_data` will train at, from the images' headers
    (no pixel decoded), for the sources on this machine: the built-in digits, an image folder,
    a save_to_disk folder. None for a hub dataset (reading it may mean a download) and when
    no image can be read. What `--dry-run` prints."""
    if is_built_in(dataset):  # known without building it: 8x8 grayscale, trained at 16
        return resolution or DIGITS_RESOLUTION, channels or DIGITS_CHANNELS
    if not Path(dataset).expanduser().is_dir():
        return None
    progress_bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a dry run prints the config alone
    try:
        source = load_source(dataset, dataset_config, split)
        ds = source.dataset
        if len(ds) == 0:
            return None
        column = detect_image_column(ds, image_column)
        if max_images is not None:
            ds = ds.select(range(min(max_images, len(ds))))
        return _shape_from_images(ds, column, source, resolution, channels)
    finally:
        if progress_bars:
            datasets.enable_progress_bars()


def _shape_from_images(
    ds: Any, column: str, source: Source, resolution: int | None, channels: int | None
) -> tuple[int, int] | None:
    """Fill the size and channels not given from the images (logged); at least 4 pixels.
    None when no image's header can be read."""
    found = common_shape(ds, column)
    if found is None:
        return None
    size, num_channels, line = found
    if resolution is None:
        resolution = source.resolution or max(size, 4)
    channels = channels or num_channels
    logger.info(
        "images: %s; training at %dx%d with %d channel(s) (--resolution/--channels to change)",
        line,
        resolution,
        resolution,
        channels,
    )
    return resolution, channels


def _read_labels(ds: Any, label_column: str | None) -> tuple[torch.Tensor, list[str]]:
    """Every row's class id and the class names; a row without a valid class is an error."""
    column = detect_label_column(ds, label_column)
    names = list(ds.features[column].names)
    labels = torch.tensor(ds[column], dtype=torch.int64)
    bad = torch.nonzero((labels < 0) | (labels >= len(names))).flatten().tolist()
    if bad:
        raise InputError(
            f"{len(bad)} row(s) have no class among the {len(names)} of column {column!r} "
            f"(e.g. rows {bad[:5]}, labels {labels[bad[:5]].tolist()}); an unlabeled split "
            "cannot train a class-conditional model",
            "label_column",
        )
    return labels, names


def _stream_preview(stream: StreamSource, fingerprint: str, source: Source) -> ImageData:
    """Streaming: decode only the first rows now (previews, evaluation references)."""
    # At most STREAM_PREVIEW_ROWS rows and 1 GiB decoded.
    image_bytes = decoded_bytes(1, stream.resolution, stream.channels)
    num_rows = max(1, min(len(stream.dataset), STREAM_PREVIEW_ROWS, 2**30 // image_bytes))
    preview = stream.dataset.select(range(num_rows))
    images, skipped, num_upscaled, rows = decode_all(
        preview, stream.image_column, stream.resolution, stream.channels, stream.center_crop
    )
    if len(images) == 0:
        raise InputError(
            f"none of the first {len(preview)} images could be read ({source.description}): "
            + first_errors(skipped),
            "dataset",
        )
    return ImageData(
        images=torch.from_numpy(images),
        fingerprint=fingerprint,
        source=f"{source.description}, streamed",
        num_skipped=len(skipped),
        skipped=skipped,
        num_upscaled=num_upscaled,
        stream=stream,
        labels=None if stream.labels is None else stream.labels[torch.from_numpy(rows)],
    )


def first_errors(skipped: list[str], num_shown: int = 3) -> str:
    """The first unreadable files with their errors, for a message."""
    more = f"; ... and {len(skipped) - num_shown} more" if len(skipped) > num_shown else ""
    return "; ".join(skipped[:num_shown]) + more


def _report(skipped: list[str], num_upscaled: int, resolution: int) -> None:
    if skipped:
        shown = "\n  ".join(skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        logger.warning("skipped %d unreadable image(s):\n  %s%s", len(skipped), shown, more)
    if num_upscaled:
        logger.info(
            "%d image(s) smaller than the resolution %d were upscaled to it",
            num_upscaled,
            resolution,
        )


def hold_out_last(data: ImageData, num_images: int) -> tuple[ImageData, torch.Tensor]:
    """Split off the last `num_images` images: (the data to train on, their uint8 images).

    The training data is the same dataset cut short, so its batch order stays a pure function
    of (seed, micro-step, rank): exact resume and the same batches on 1 or N processes. Its
    fingerprint says what was cut, so caches keyed by it never mix the two sets. Streamed data
    decodes the held-out rows here (and trains on the rows before them).
    """
    total = data.num_images
    if not 1 <= num_images < total:
        raise InputError(
            f"must be between 1 and {total - 1} for a dataset of {total} images, got {num_images}",
            "num_holdout",
        )
    fingerprint = f"{data.fingerprint}-without-last-{num_images}"
    if data.stream is None:
        kept = total - num_images
        labels = None if data.labels is None else data.labels[:kept]
        held_out = data.images[kept:]
        train = replace(data, images=data.images[:kept], fingerprint=fingerprint, labels=labels)
        return train, held_out
    stream = data.stream
    kept = len(stream.dataset) - num_images
    decoded = decode_all(
        stream.dataset.select(range(kept, len(stream.dataset))),
        stream.image_column,
        stream.resolution,
        stream.channels,
        stream.center_crop,
    )[0]
    if len(decoded) == 0:
        raise InputError(f"none of the last {num_images} images could be read", "num_holdout")
    stream = replace(
        stream,
        dataset=stream.dataset.select(range(kept)),
        labels=None if stream.labels is None else stream.labels[:kept],
    )
    num_preview = min(len(data.images), kept)
    labels = None if data.labels is None else data.labels[:num_preview]
    train = replace(
        data,
        images=data.images[:num_preview],
        fingerprint=fingerprint,
        stream=stream,
        labels=labels,
    )
    return train, torch.from_numpy(decoded)
