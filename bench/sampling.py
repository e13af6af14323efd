"""Sampling throughput of every sampler, at several batch sizes, with network evaluations.

    python bench/sampling.py                                  # digits-small at 16x16 on CPU
    python bench/sampling.py --preset ddpm-cifar10 --resolution 32 --channels 3 \
        --batch-sizes 64,256,1024 --mixed-precision bf16     # on a GPU
    python bench/sampling.py --samplers ddim:50,edm-heun:18   # a subset, steps of your choice
    python bench/sampling.py --samplers flow/dpm++2m:20       # KIND/NAME: a name kinds share

The network is freshly initialised: cost per evaluation does not depend on the weights. Each
sampler runs through its kind's `sampler` (diffusion/kinds/<name>/), the code `sample.py` and
the training grids use; "evals" counts the network evaluations.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_revision, machine, print_table, synchronize  # noqa: E402
from ddp_utils.compile import COMPILE_MODES, compile_network  # noqa: E402
from diffusion.drawing import count_calls  # noqa: E402
from diffusion.kinds import KINDS, choose_sampler  # noqa: E402
from diffusion.kinds.ddpm.formulation import make_train_scheduler  # noqa: E402
from diffusion.kinds.edm.formulation import make_edm_scheduler  # noqa: E402
from diffusion.kinds.flow.formulation import make_flow_scheduler  # noqa: E402
from diffusion.networks import sample_shape  # noqa: E402
from diffusion.networks.unet import build_ddpm_unet  # noqa: E402

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLERS = (
    "ddpm:1000,ddim:50,dpm-solver:20,dpm-solver-2m-karras:20,dpm-solver-3m-karras:20,"
    "unipc:20,euler-karras:20,heun-karras:10,edm-heun:18,edm-euler:35,edm/dpm++2m:20,"
    "flow/euler:50,flow/heun:25,flow/dpm++2m:20,flow/euler-ancestral:50"
)


def run(
    name: str,
    steps: int,
    net: torch.nn.Module,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    # "KIND/NAME" picks a sampler name two kinds share (flow/dpm++2m); else the first kind's.
    kind_name, _, name = name.rpartition("/")
    kind = KINDS[kind_name] if kind_name else next(k for k in KINDS.values() if name in k.samplers)
    configs = {
        "ddpm": lambda: make_train_scheduler("squaredcos_cap_v2", 1000, "epsilon").config,
        "edm": lambda: make_edm_scheduler().config,
        "flow": lambda: make_flow_scheduler().config,
    }
    config = configs[kind.name]() if kind.name in configs else {}
    choice = choose_sampler(kind, name, steps, {}, source="bench", scheduler_config=config)
    shape = sample_shape(net)
    kind.sampler(net, config, choice, seed=0, shape=shape, device=device, dtype=dtype)(
        range(batch), None, None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits-small")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--mixed-precision", default="no", choices=list(DTYPES))
    parser.add_argument("--samplers", default=SAMPLERS, help="name:steps,...")
    parser.add_argument("--compile", action="store_true", help="as sample.py --compile")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = build_ddpm_unet(args.preset, args.resolution, args.channels).to(device).eval()
    dtype, calls = DTYPES[args.mixed_precision], count_calls(unet)
    if args.compile:  # the warm-up run below compiles (once per batch size)
        compile_network(unet, "inductor", args.compile_mode)
    rows = []
    for spec in args.samplers.split(","):
        name, steps = spec.split(":")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            run(name, 2, unet, batch, device, dtype)  # warm-up
            synchronize(device)
            calls[0] = 0
            start = time.perf_counter()
            run(name, int(steps), unet, batch, device, dtype)
            synchronize(device)
            seconds = time.perf_counter() - start
            rows.append([f"{name}-{steps}", calls[0], batch, f"{batch / seconds:,.2f}",
                         f"{1000 * seconds / calls[0]:,.1f}"])  # fmt: skip
    print(f"\nmachine: {machine()}; git {git_revision()}; {time.strftime('%Y-%m-%d')}")
    print(
        f"preset {args.preset} at {args.resolution}x{args.resolution}x{args.channels}, "
        f"precision {args.mixed_precision}, compile "
        f"{args.compile_mode if args.compile else 'off'}\n"
    )
    print_table(["sampler", "evals", "batch", "images/s", "ms/eval"], rows)


if __name__ == "__main__":
    main()
