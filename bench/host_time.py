"""Host time per training step in the launch-bound regime: the toolkit's loop vs a plain loop.

    python bench/host_time.py                       # digits-small, batch 1, 8x8x1, fp32
    python bench/host_time.py --mixed-precision bf16 --steps 200

On a GPU a small model's step is bound by the host: the Python, dispatch and launch work around
each kernel, not the kernels. This measures that work on a CPU, where it can be isolated: at
batch 1 and 8x8 pixels every op is nearly free, so a step's CPU time is its host overhead.
Times are the thread's CPU time (`time.thread_time`), not wall time, so other processes on the
machine barely move them. Sides:

- toolkit: the real `train_ddpm.train` loop (DDPM, v-prediction, EMA, clipping, the guard,
  metrics), with each part of `optimizer_step` and the EMA update timed separately;
- plain: a textbook loop (forward, MSE, backward, AdamW with the `foreach` implementation CUDA
  uses by default, zero_grad), data already on the device, epsilon target;
- plain + clip + EMA: the same with gradient clipping and a foreach EMA, the work the toolkit
  also does every step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_ddpm  # noqa: E402
from bench.common import git_revision, machine, print_table  # noqa: E402
from ddp_utils import loop  # noqa: E402
from ddp_utils.ema import EMA  # noqa: E402
from diffusion.kinds.ddpm import DDPMMethod  # noqa: E402
from diffusion.kinds.ddpm.formulation import make_train_scheduler  # noqa: E402
from diffusion.networks.unet import build_ddpm_unet  # noqa: E402
from tests.tiny_runs import fresh_accelerate_state  # noqa: E402

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16}


class PartTimer:
    """CPU time of named parts of a step, collected by wrapping the functions that do them."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.enabled = False

    def wrap(self, owner: object, attribute: str, part: str) -> None:
        real = getattr(owner, attribute, None)
        if real is None:  # an older checkout without that function: its time is the loop's
            return

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                if self.enabled:
                    self.times[part].append(time.thread_time() - start)

        setattr(owner, attribute, timed)


def toolkit_ms(args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """Median CPU ms per loop step of the real training loop, and the median of each part."""
    timer = PartTimer()
    step_times: list[float] = []
    real_step = loop.optimizer_step
    # Parts inside optimizer_step (the names it looks up at call time).
    timer.wrap(DDPMMethod, "loss", "loss (noise, forward, target, metrics)")
    import accelerate

    timer.wrap(accelerate.Accelerator, "backward", "backward")
    timer.wrap(loop, "clip_gradients", "clip")
    timer.wrap(loop, "guarded_step", "optimizer (fused AdamW, skip on device)")
    timer.wrap(EMA, "update", "EMA")

    def step(*a, **k):
        step_index = a[-1]
        timer.enabled = step_index >= args.warmup
        start = time.thread_time()
        out = real_step(*a, **k)
        if timer.enabled:
            step_times.append(time.thread_time() - start)
        return out

    loop.optimizer_step = step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fresh_accelerate_state()
            train_ddpm.main(
                [
                    "--preset", args.preset, "--batch-size", str(args.batch_size),
                    "--resolution", str(args.resolution), "--channels", str(args.channels),
                    "--max-steps", str(args.warmup + args.steps), "--log-every", "1000000",
                    "--checkpoint-every", "1000000", "--sample-every", "0",
                    "--num-sample-images", "1", "--sample-steps", "1", "--report-to", "none",
                    "--resume", "none", "--output-dir", tmp,
                    "--mixed-precision", args.mixed_precision,
                ]
            )  # fmt: skip
    finally:
        loop.optimizer_step = real_step
    # The EMA update runs after optimizer_step: add it to the step's total.
    ema = timer.times.get("EMA", [])
    totals = [s + e for s, e in zip(step_times, ema)] if ema else step_times
    parts = {name: 1000 * statistics.median(v) for name, v in timer.times.items() if name}
    return 1000 * statistics.median(totals), parts


def plain_ms(args: argparse.Namespace, clip_and_ema: bool) -> float:
    """Median CPU ms per step of a textbook loop (foreach AdamW, CUDA's default)."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_ddpm_unet(args.preset, args.resolution, args.channels).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    scheduler = make_train_scheduler("squaredcos_cap_v2", 1000, "epsilon")
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    params = [p for p in model.parameters()]
    shadow = [p.detach().clone() for p in params]
    data = torch.rand(256, args.channels, args.resolution, args.resolution, device=device)
    dtype = DTYPES[args.mixed_precision]
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )

    def step() -> None:
        x = data[torch.randint(len(data), (args.batch_size,), device=device)] * 2 - 1
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (args.batch_size,), device=device)
        with autocast:
            pred = model(scheduler.add_noise(x, noise, t), t).sample
            loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        if clip_and_ema:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if clip_and_ema:
            with torch.no_grad():
                torch._foreach_lerp_(shadow, params, 1 - 0.999)

    times = []
    for i in range(args.warmup + args.steps):
        start = time.thread_time()
        step()
        if i >= args.warmup:
            times.append(time.thread_time() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits-small")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="sides alternate; median of all")
    parser.add_argument("--mixed-precision", default="no", choices=list(DTYPES))
    args = parser.parse_args()
    torch.set_num_threads(1)

    toolkit, plain, plain_full, parts_by_round = [], [], [], []
    for _ in range(args.rounds):
        ms, parts = toolkit_ms(args)
        toolkit.append(ms)
        parts_by_round.append(parts)
        plain.append(plain_ms(args, clip_and_ema=False))
        plain_full.append(plain_ms(args, clip_and_ema=True))
    tk, pl, pf = (statistics.median(v) for v in (toolkit, plain, plain_full))
    print(f"machine: {machine()}; git {git_revision()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"{args.preset}, batch {args.batch_size}, {args.resolution}x{args.resolution}x"
        f"{args.channels}, precision {args.mixed_precision}, {args.steps} steps x {args.rounds} "
        "rounds, CPU ms per step (thread time, median)\n"
    )
    print_table(
        ["loop", "host ms/step", "vs plain"],
        [
            ["toolkit (train_ddpm.py)", f"{tk:.2f}", f"{tk / pl:.3f}"],
            ["plain (foreach AdamW)", f"{pl:.2f}", "1.000"],
            ["plain + clip + EMA", f"{pf:.2f}", f"{pf / pl:.3f}"],
        ],
    )
    print("\ntoolkit step by part (median CPU ms; the rest is the loop's own work):")
    names = list(parts_by_round[-1])
    print_table(
        ["part", "ms"],
        [[n, f"{statistics.median(r.get(n, 0.0) for r in parts_by_round):.2f}"] for n in names],
    )


if __name__ == "__main__":
    main()
