"""Training throughput: the toolkit's real loop next to a plain PyTorch loop, timed alternately.

    python bench/train_step.py                                   # CPU defaults (small batches)
    python bench/train_step.py --models ddpm-cifar10 --batch-sizes 128 --mixed-precision bf16
    python bench/train_step.py --models digits-small,digits-small:edm --resolution 16 --channels 1

For each model the toolkit side runs the real `train_ddpm.train` / `train_basic.train` (report
to none, no samples or checkpoints inside the timed window) and reads images/s from the run's
own `metrics.jsonl`, skipping the first window (start-up, first-step allocations, compilation).
The plain side is a textbook loop with the same model, batch, optimizer and precision and the
data already on the device, no Accelerate. Rounds alternate (toolkit, plain, toolkit, ...) so a
noisy machine slows both sides alike; the table reports the median over rounds.
FLOPs per image come from torch.utils.flop_counter (forward + backward at batch 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_basic  # noqa: E402
import train_ddpm  # noqa: E402
from bench.common import (  # noqa: E402
    git_revision,
    machine,
    peak_tflops,
    print_table,
    synchronize,
    train_flops_per_image,
)
from ddp_utils.data import load_image_data  # noqa: E402
from diffusion.kinds.basic.formulation import corrupt  # noqa: E402
from diffusion.kinds.ddpm.formulation import make_train_scheduler  # noqa: E402
from diffusion.networks import predict  # noqa: E402
from diffusion.networks.basic import build_basic_model  # noqa: E402
from diffusion.networks.unet import build_ddpm_unet  # noqa: E402

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BATCH = {"basic": 128, "digits-small": 64, "unet-4.7m": 16, "unet-18.5m": 8, "ddpm-cifar10": 4}


def build(name: str, resolution: int, channels: int) -> torch.nn.Module:
    """`name`: basic, unet, or a UNet preset, optionally `:edm` (train_ddpm.py --objective edm;
    the plain loop stays DDPM's, a yardstick common to both objectives)."""
    name = name.partition(":")[0]
    if name in ("basic", "unet"):
        return build_basic_model(name, resolution, channels)
    return build_ddpm_unet(name, resolution, channels)


def toolkit_images_per_s(name: str, args, batch: int, out: Path) -> float:
    """Run the real training script for 2 windows of --steps; images/s of the second window."""
    common = [
        "--dataset", "digits", "--resolution", str(args.resolution),
        "--channels", str(args.channels), "--batch-size", str(batch),
        "--max-steps", str(2 * args.steps), "--log-every", str(args.steps),
        "--checkpoint-every", str(10**9), "--checkpoints-total-limit", "1",
        "--sample-every", "0", "--num-sample-images", "1", "--sample-steps", "1",
        "--report-to", "none", "--resume", "none", "--output-dir", str(out),
        "--mixed-precision", args.mixed_precision,
    ]  # fmt: skip
    if args.channels_last:
        common.append("--channels-last")
    if args.compile:
        common += ["--compile", "--compile-mode", args.compile_mode]
    if name in ("basic", "unet"):
        train_basic.train(
            train_basic.parse_config(train_basic.BasicConfig, [*common, "--model", name])
        )
    else:
        preset, _, objective = name.partition(":")
        flags = [*common, "--preset", preset, "--objective", objective or "ddpm"]
        train_ddpm.train(train_ddpm.parse_config(train_ddpm.DDPMConfig, flags))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    shutil.rmtree(out, ignore_errors=True)
    return rates[-1]


def plain_images_per_s(name: str, args, batch: int, images: torch.Tensor, device) -> float:
    """A textbook loop: same model, batch, optimizer and precision; no Accelerate."""
    torch.manual_seed(0)
    model = build(name, args.resolution, args.channels).to(device).train()
    basic = name in ("basic", "unet")  # a preset (with or without :edm) trains DDPM here
    optimizer = (torch.optim.Adam if basic else torch.optim.AdamW)(
        model.parameters(), lr=1e-3 if basic else 4e-4
    )
    scheduler = None if basic else make_train_scheduler("squaredcos_cap_v2", 1000, "epsilon")
    if scheduler is not None:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    dtype = DTYPES[args.plain_precision or args.mixed_precision]
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    data = images.to(device)
    low = 0.0 if basic else -1.0

    def step() -> None:
        x = (
            data[torch.randint(len(data), (batch,), device=device)].float() * ((1 - low) / 255)
            + low
        )
        with autocast:
            if basic:
                amount = torch.rand(batch, device=device)
                loss = F.mse_loss(predict(model, corrupt(x, amount), 0).float(), x)
            else:
                noise = torch.randn_like(x)
                t = torch.randint(0, 1000, (batch,), device=device)
                pred = model(scheduler.add_noise(x, noise, t), t).sample
                loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.steps):  # warm-up window, like the toolkit's first window
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return args.steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="basic,unet-4.7m,unet-18.5m,ddpm-cifar10")
    parser.add_argument("--batch-sizes", default=None, help="comma list; default per model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--mixed-precision", default="no", choices=list(DTYPES))
    parser.add_argument(
        "--plain-precision",
        default=None,
        choices=list(DTYPES),
        help="precision of the plain loop (default: same as the toolkit)",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="train_ddpm.py --compile-mode (reduce-overhead: CUDA graphs)",
    )
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, peak_source = peak_tflops(device)
    images = load_image_data("digits", args.resolution, args.channels).images
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = []
    for name in args.models.split(","):
        batches = (
            [int(b) for b in args.batch_sizes.split(",")]
            if args.batch_sizes
            else [CPU_BATCH.get(name.partition(":")[0], 32) if device.type == "cpu" else 128]
        )
        model = build(name, args.resolution, args.channels).to(device)
        flops = train_flops_per_image(
            model,
            lambda x, m=model: predict(m, x, torch.zeros(1, device=device)),
            (args.channels, args.resolution, args.resolution),
        )
        num_params = sum(p.numel() for p in model.parameters())
        del model
        for batch in batches:
            toolkit, plain = [], []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for r in range(args.rounds):
                toolkit.append(toolkit_images_per_s(name, args, batch, workdir / f"{name}-{r}"))
                plain.append(plain_images_per_s(name, args, batch, images, device))
            tk, pl = statistics.median(toolkit), statistics.median(plain)
            print(
                f"{name} batch {batch}: toolkit img/s per round "
                f"{[round(v, 1) for v in toolkit]}, plain {[round(v, 1) for v in plain]}",
                flush=True,
            )
            achieved = tk * flops / 1e12
            memory = (
                f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                if device.type == "cuda"
                else "n/a (CPU)"
            )
            rows.append([
                name, f"{num_params:,}", batch, f"{tk:,.1f}", f"{1000 * batch / tk:,.1f}",
                f"{pl:,.1f}", f"{tk / pl:.3f}", f"{flops / 1e9:.2f}", f"{achieved:.4g}",
                f"{100 * achieved / peak:.1f}%", memory,
            ])  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nmachine: {machine()}; git {git_revision()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"precision {args.mixed_precision} (plain: {args.plain_precision or args.mixed_precision})"
        f", resolution {args.resolution}, channels {args.channels}, {args.steps} steps x "
        f"{args.rounds} rounds, channels_last={args.channels_last}, "
        f"compile={args.compile_mode if args.compile else False}; "
        f"MFU peak: {peak:.3g} TFLOP/s ({peak_source})\n"
    )
    print_table(
        ["model", "params", "batch/device", "toolkit img/s", "ms/step", "plain img/s",
         "toolkit/plain", "train GFLOP/img", "TFLOP/s", "MFU", "peak mem"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
