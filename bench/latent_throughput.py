"""What a latent diffusion run (train_ddpm.py --vae) costs and saves, next to the same run on
pixels: encoding, the cache on disk, training steps, decoding.

    python bench/latent_throughput.py runs/ae-digits/model            # digits at 32x32, CPU
    python bench/latent_throughput.py runs/ae-digits/model --quick    # seconds: a smoke run
    python bench/latent_throughput.py runs/ae-digits/model --device cuda --mixed-precision bf16
    python bench/latent_throughput.py --untrained ae-digits     # no trained folder at hand

`--untrained PRESET` times a freshly initialised AutoencoderKL of a train_autoencoder.py preset
instead of a trained folder: the same shapes and operations, so the same images/s (what a GPU
lease can run on a clean checkout, where runs/ does not exist); its scale is the config's.

(a) Encoding: the posterior mean and std of the whole dataset through the codec's encode path
(`LatentCodec.encode`, in its chunks), in images/s; then the latent cache the training script
writes (`load_latents`, with and without flips) against the decoded-image cache, in bytes on
disk, both built in a scratch folder so nothing of yours is read or overwritten.
(b) Training: one step of the same backbone and objective (a UNet preset, DDPM's epsilon MSE,
AdamW) on a batch of latents z = (mean + std * eps - shift) * scale, as the latent batches
draw them, and on a batch of pixels in [-1, 1]: forward, backward, optimizer step. Warm-up
steps, then the timed ones, latents and pixels alternating round by round so a shared machine
slows both alike; the median round is reported.
(c) Decoding: what sampling adds per image on top of the network's steps (`LatentCodec.decode`,
the exported pipeline's chunked decode).
Every timing is taken at each of --threads (one torch thread and the default).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    git_revision,
    machine,
    print_table,
    synchronize,
    tree_state,
)
from ddp_utils.data import load_image_data, load_latents  # noqa: E402
from diffusion.autoencoder.presets import build_autoencoder  # noqa: E402
from diffusion.codecs import DTYPES, load_codec, measured_scale  # noqa: E402
from diffusion.kinds.ddpm.formulation import make_train_scheduler  # noqa: E402
from diffusion.networks import count_parameters  # noqa: E402
from diffusion.networks.unet import build_ddpm_unet  # noqa: E402

DEFAULT_VAE = "runs/ae-digits/model"


def disk_bytes(folder: Path, pattern: str) -> int:
    """Bytes of the files (or folders of files) in `folder` matching `pattern`."""
    total = 0
    for path in folder.glob(pattern):
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1], what the codec and the pixel path see."""
    return images.to(torch.float32) * (2.0 / 255.0) - 1.0


def images_per_s(
    fn: Callable[[torch.Tensor], object], inputs: torch.Tensor, device: torch.device
) -> float:
    """Images/s of `fn` (the codec's encode or decode) over all of `inputs`, after a warm-up
    on 8 of them."""
    fn(inputs[:8])
    synchronize(device)
    start = time.perf_counter()
    fn(inputs)
    synchronize(device)
    return len(inputs) / (time.perf_counter() - start)


class Trainer:
    """One DDPM training step of a UNet preset on batches drawn by `draw(generator)`."""

    def __init__(
        self,
        preset: str,
        shape: tuple[int, int, int],
        draw: Callable[[torch.Generator], torch.Tensor],
        args: argparse.Namespace,
        device: torch.device,
    ) -> None:
        torch.manual_seed(0)
        self.model = build_ddpm_unet(preset, shape[1], shape[0]).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scheduler = make_train_scheduler("squaredcos_cap_v2", 1000, "epsilon")
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.draw, self.batch, self.device = draw, args.batch_size, device
        dtype = DTYPES[args.mixed_precision]
        self.autocast = (
            torch.autocast(device.type, dtype=dtype)
            if dtype != torch.float32
            else contextlib.nullcontext()
        )
        self.generator = torch.Generator(device).manual_seed(0)

    def steps(self, num_steps: int) -> float:
        """Images/s over `num_steps` steps."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(num_steps):
            x = self.draw(self.generator)
            noise = torch.randn(x.shape, generator=self.generator, device=self.device)
            t = torch.randint(0, 1000, (len(x),), generator=self.generator, device=self.device)
            with self.autocast:
                pred = self.model(self.scheduler.add_noise(x, noise, t), t).sample
                loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return num_steps * self.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("vae", nargs="?", default=DEFAULT_VAE, help="AutoencoderKL folder")
    parser.add_argument(
        "--untrained", metavar="PRESET", help="an untrained AutoencoderKL of this preset"
    )
    parser.add_argument("--channels", type=int, default=1, help="image channels (--untrained)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--preset", default="digits-small", help="UNet preset of both runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,default", help="torch threads to time, comma list")
    parser.add_argument("--num-decode", type=int, default=256, help="images to decode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 256 images, 1 thread, 1 round of 2 steps"
    )
    args = parser.parse_args()
    if args.quick:
        args.max_images = min(args.max_images or 256, 256)
        args.warmup_steps, args.steps, args.rounds = 1, 2, 1
        args.threads, args.num_decode = "1", 16
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    threads = [default_threads if t == "default" else int(t) for t in args.threads.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="bench-latent-"))
    try:
        if args.untrained:
            torch.manual_seed(0)
            vae = build_autoencoder(args.untrained, args.resolution, args.channels)
            vae.save_pretrained(scratch / "vae", safe_serialization=True)
            args.vae = str(scratch / "vae")
        run(args, device, threads, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, device: torch.device, threads: list[int], scratch: Path) -> None:
    codec = load_codec(Path(args.vae), dtype=DTYPES[args.mixed_precision]).to(device)
    data = load_image_data(
        args.dataset, args.resolution, codec.channels, max_images=args.max_images,
        cache_dir=scratch,
    )  # fmt: skip
    num_images = len(data.images)
    pixels = to_pixels(data.images)
    latent_channels, latent_side = codec.latent_shape(args.resolution)
    print(
        f"machine: {machine()}; git {git_revision()} ({tree_state()}); "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    print(
        f"VAE {f'untrained {args.untrained}' if args.untrained else args.vae} "
        f"({count_parameters(codec.vae):,} params, {codec.vae.dtype}); "
        f"{args.dataset}: {num_images:,} images {codec.channels}x{args.resolution}x"
        f"{args.resolution} -> latents {latent_channels}x{latent_side}x{latent_side}; "
        f"device {device}, precision {args.mixed_precision}\n"
    )

    # (a) Encode, and the caches on disk.
    encode_rows = []
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        rate = images_per_s(codec.encode, pixels, device)
        encode_rows.append([num_threads, f"{num_images:,}", f"{rate:,.1f}"])
    image_cache = disk_bytes(scratch, "images-*")
    latent_cache = {}
    for flip in (False, True):
        folder = scratch / f"latents-flip-{flip}"
        latents = load_latents(data, codec, flip, cache_dir=folder)
        latent_cache[flip] = disk_bytes(folder, "*")
    # as_tensor: the cache may hand back memory-mapped (float16) arrays instead of tensors
    mean = torch.as_tensor(latents.mean).to(device, torch.float32)
    std = torch.as_tensor(latents.std).to(device, torch.float32)
    scale = codec.scaling_factor or measured_scale(mean.cpu(), std.cpu())
    print("(a) encoding: posterior mean and std of the whole dataset, in the codec's chunks")
    print_table(["threads", "images", "encode img/s"], encode_rows)
    print("\nthe caches on disk, as train_ddpm.py writes them")
    print_table(
        ["decoded images", "latents", "latents, flips", "latents / images"],
        [[f"{image_cache:,} B", f"{latent_cache[False]:,} B", f"{latent_cache[True]:,} B",
          f"{latent_cache[False] / image_cache:.2f}x"]],
    )  # fmt: skip

    # (b) Training steps, latents vs pixels.
    shift = codec.shift_factor
    images_on_device = data.images.to(device)

    def draw_latents(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(mean), (args.batch_size,), generator=generator, device=device)
        eps = torch.randn(mean[index].shape, generator=generator, device=device)
        return (mean[index] + std[index] * eps - shift) * scale

    def draw_pixels(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(num_images, (args.batch_size,), generator=generator, device=device)
        return to_pixels(images_on_device[index])

    sides = {
        "latents": Trainer(args.preset, (latent_channels, latent_side, latent_side),
                           draw_latents, args, device),
        "pixels": Trainer(args.preset, (codec.channels, args.resolution, args.resolution),
                          draw_pixels, args, device),
    }  # fmt: skip
    rows = []
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for trainer in sides.values():
            trainer.steps(args.warmup_steps)
        for _ in range(args.rounds):
            for name, trainer in sides.items():
                rates[name].append(trainer.steps(args.steps))
        lat, pix = statistics.median(rates["latents"]), statistics.median(rates["pixels"])
        rows.append([
            num_threads, f"{lat:,.1f}", f"{pix:,.1f}", f"{lat / pix:.2f}x",
            f"{[round(r, 1) for r in rates['latents']]}", f"{[round(r, 1) for r in rates['pixels']]}",
        ])  # fmt: skip
    params = {name: f"{count_parameters(t.model):,}" for name, t in sides.items()}
    print(
        f"\n(b) training, {args.preset} (latents {params['latents']} params, pixels "
        f"{params['pixels']}), DDPM epsilon MSE, AdamW, batch {args.batch_size}: "
        f"{args.warmup_steps} warm-up steps, then {args.rounds} rounds of {args.steps} steps"
    )
    print_table(
        ["threads", "latents img/s", "pixels img/s", "latents / pixels", "latent rounds",
         "pixel rounds"],
        rows,
    )  # fmt: skip

    # (c) Decoding: what a sampled image costs on top of the network's steps.
    z = draw_latents(torch.Generator(device).manual_seed(1))
    z = torch.cat([z] * (args.num_decode // len(z) + 1))[: args.num_decode]
    decode_rows = []
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        rate = images_per_s(codec.decode, z, device)
        decode_rows.append([num_threads, args.num_decode, f"{rate:,.1f}", f"{1000 / rate:.2f}"])
    print("\n(c) decoding scaled latents to images (the exported pipeline's chunked decode)")
    print_table(["threads", "images", "decode img/s", "ms per image"], decode_rows)


if __name__ == "__main__":
    main()
