"""Data path throughput: per-image PIL decoding through a DataLoader vs the decoded uint8 tensor.

    python bench/data_loading.py                 # digits written as 32x32 PNGs, batch 128

The per-image path is what the diffusers example and most tutorials do: an HF `imagefolder` dataset
whose transform opens each PNG with PIL and runs torchvision transforms, through a DataLoader
with workers. The tensor path is the toolkit's: the dataset decoded once into a uint8 tensor
(`ddp_utils.data.load_image_data`), batches gathered on the device, flip done on the device.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_revision, machine, print_table  # noqa: E402
from ddp_utils.data import (  # noqa: E402
    ImageData,
    batch_indices,
    load_image_data,
    make_batches,
    to_float,
)


def write_folder(folder: Path, resolution: int) -> int:
    images = load_image_data("digits", resolution, 3).images  # (N, 3, R, R) uint8
    for i, image in enumerate(images):
        sub = folder / str(i % 10)
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(sub / f"{i:05d}.png")
    return len(images)


def per_image_rate(folder: Path, batch: int, num_workers: int, num_batches: int) -> float:
    from datasets import load_dataset
    from torchvision import transforms

    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train")
    tf = transforms.Compose(
        [transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(0.5, 0.5)]
    )
    dataset.set_transform(lambda b: {"x": [tf(im.convert("RGB")) for im in b["image"]]})
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=True,
    )
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    next(batches)  # start the workers outside the timed window
    start = time.perf_counter()
    for _ in range(num_batches):
        x = next(batches)["x"]
    assert x.shape[0] == batch
    return num_batches * batch / (time.perf_counter() - start)


def stream_rate(
    folder: Path, resolution: int, batch: int, num_workers: int, num_batches: int
) -> float:
    """The toolkit's own per-image path: --data-loading stream (workers decode each batch)."""
    data = load_image_data(str(folder), resolution, 3, data_loading="stream")
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    batches = make_batches(data, batch, acc, 0, (-1.0, 1.0), True, num_workers=num_workers)
    generator = torch.Generator().manual_seed(0)
    batches.get(0, generator)  # start the workers outside the timed window
    start = time.perf_counter()
    for step in range(1, num_batches + 1):
        x = batches.get(step, generator).images
    assert x.shape[0] == batch
    return num_batches * batch / (time.perf_counter() - start)


def tensor_rate(data: ImageData, batch: int, num_batches: int, device: torch.device) -> float:
    images = data.images.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    for step in range(num_batches):
        index = batch_indices(step, len(images), batch, 1, 0, 0).to(device)
        x = to_float(images[index], (-1.0, 1.0), generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert x.shape[0] == batch
    return num_batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--num-batches", type=int, default=40)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        num_images = write_folder(folder, args.resolution)
        data = load_image_data(str(folder), args.resolution, 3)
        slow = per_image_rate(folder, args.batch_size, args.num_workers, args.num_batches)
        stream = stream_rate(
            folder, args.resolution, args.batch_size, args.num_workers, args.num_batches
        )
        fast = tensor_rate(data, args.batch_size, 10 * args.num_batches, device)
    print(f"\nmachine: {machine()}; git {git_revision()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"{num_images} PNGs at {args.resolution}x{args.resolution} RGB, batch {args.batch_size}, "
        f"DataLoader workers {args.num_workers}, tensor path on {device}\n"
    )
    print_table(
        ["path", "images/s", "speed-up"],
        [
            ["per-image (imagefolder + PIL + torchvision, DataLoader)", f"{slow:,.0f}", "1.0x"],
            [
                "--data-loading stream (toolkit, workers)",
                f"{stream:,.0f}",
                f"{stream / slow:,.1f}x",
            ],
            ["--data-loading memory: decoded uint8 tensor", f"{fast:,.0f}", f"{fast / slow:,.1f}x"],
        ],
    )


if __name__ == "__main__":
    main()
