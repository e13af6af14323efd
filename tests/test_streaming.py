"""The streaming data path serves exactly the in-memory path's batches, decoded by workers."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_utils.data import MemoryBatches, StreamingBatches, StreamSource, load_image_data
from ddp_utils.data.load import choose_data_loading
from ddp_utils.data.source import detect_image_column, load_source

VALUE_RANGE = (-1.0, 1.0)


def fake_accelerator(rank: int = 0, world: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=world,
        process_index=rank,
    )


def write_folder(folder: Path, num_images: int, bad: tuple[int, ...] = ()) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(num_images):
        path = folder / f"{i:03d}.png"
        if i in bad:
            path.write_bytes(b"not a png")
        else:
            size = (12 + i % 5, 10 + i % 3)
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_equals_memory_batches_from_any_start(tmp_path: Path, num_workers: int) -> None:
    write_folder(tmp_path / "images", 23)
    memory = load_image_data(str(tmp_path / "images"), 8, 3, cache_dir=tmp_path / "cache")
    ds = load_source(str(tmp_path / "images")).dataset
    column = detect_image_column(ds, None)
    for rank in (0, 1):
        acc = fake_accelerator(rank, 2)
        common = (5, acc, 3, VALUE_RANGE, True)
        expected = MemoryBatches(memory, *common)
        # Start mid-epoch (23 images, global batch 10): a resume at micro-step 4.
        source = StreamSource(ds, column, 8, 3, True)
        stream = StreamingBatches(source, *common, start_micro_step=4, num_workers=num_workers)
        for micro_step in range(4, 10):
            # The same float batches, flipped by the same draws from the step's generator.
            batches = [
                source.get(micro_step, torch.Generator().manual_seed(micro_step)).images
                for source in (stream, expected)
            ]
            assert torch.equal(*batches), micro_step
        with pytest.raises(RuntimeError, match="consecutive"):
            stream.get(20, torch.Generator())


def test_unreadable_rows_are_replaced_and_named(tmp_path: Path, caplog) -> None:
    write_folder(tmp_path / "images", 6, bad=(2,))
    ds = load_source(str(tmp_path / "images")).dataset
    source = StreamSource(ds, "image", 8, 3, True)
    stream = StreamingBatches(source, 6, fake_accelerator(), 0, (0.0, 1.0), False, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="ddp_diffusion"):
        batch = stream.uint8_images(0)
    assert batch.shape == (6, 3, 8, 8) and batch.dtype == torch.uint8
    assert "002.png" in caplog.text and "replaced 1 unreadable" in caplog.text


def test_auto_streams_only_what_does_not_fit() -> None:
    assert choose_data_loading("auto", 50_000, 32, 3) == "memory"  # CIFAR-10: 150 MB
    assert choose_data_loading("auto", 1_281_167, 64, 3) == "stream"  # ImageNet 64: 15.7 GB
    assert choose_data_loading("stream", 10, 8, 1) == "stream"
