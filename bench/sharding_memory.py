"""What --sharding fsdp saves: per-GPU memory of every preset by arithmetic, and a measured run.

    # the table (arithmetic, no GPU): every preset, 8 GPUs, batch 32 per GPU, bf16
    python bench/sharding_memory.py table --gpus 8 --batch-size 32
    # measured: peak memory per process and step time, DDP vs FSDP2, two CPU processes
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml bench/sharding_memory.py \\
        measure --preset dit-b-2 --sharding fsdp
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml bench/sharding_memory.py \\
        measure --preset dit-b-2 --sharding none

The table: per GPU, model state (bytes per parameter: fp32 weights 4, gradients 4, AdamW's
two moments 8, EMA 4; DDP adds its gradient buckets, 4) plus activations. DDP: 24 P. FSDP2
over N GPUs: 20 P / N, plus what is gathered at a time: the root unit's bf16 weights (held
through the step) and two blocks in flight (the one computing and the one prefetched), each
with bf16 weights, bf16 gradients and the fp32 copy reduce-scattered: 2 R + 2 x 8 U bytes for
a largest block of U parameters. Activations are counted, not estimated: a forward of the
network at the batch on the meta device (no memory, no compute) with bf16 weights and inputs,
as FSDP2's mixed precision computes, summing the bytes of every tensor autograd saves for the
backward (each storage once, parameters left out); attention saves what a fused kernel saves
(inputs, output, log-sum-exp: FlashAttention's footprint, not the T x T scores). With
activation checkpointing per block, a block keeps only its input, and one block at a time
recomputes the rest: what is saved outside blocks + every block's input + the largest
block's saved bytes. Not counted: the CUDA context and allocator slack (~1-3 GB), temporary
buffers, the data.

`measure`: this process trains `train_ddpm.py` (built-in digits upscaled to --resolution)
for --steps steps, then prints its peak GPU memory when on a GPU (torch's
max_memory_allocated, as of the last optimizer step), its peak resident memory (ru_maxrss: Python, torch, the data
and everything else too) as of the last optimizer step (`training`: set-up and training) and
at the end (`end`: the checkpoint save and the export too), and the steps' mean time from
metrics.jsonl (first step left out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import git_revision, machine, print_table  # noqa: E402

GiB = 2**30
# (preset, backbone, resolution, channels, condition) at the setting each is made for.
PRESETS = [
    ("digits-small", "unet", 16, 1, "none"),
    ("unet-4.7m", "unet", 32, 3, "none"),
    ("unet-18.5m", "unet", 32, 3, "none"),
    ("ddpm-cifar10", "unet", 32, 3, "none"),
    ("dit-digits", "dit", 16, 1, "classes"),
    ("dit-s-2", "dit", 32, 4, "classes"),  # ImageNet-256 latents: 256 tokens
    ("dit-b-2", "dit", 32, 4, "classes"),
    ("dit-l-2", "dit", 32, 4, "classes"),
    ("dit-xl-2", "dit", 32, 4, "classes"),
    ("sd15", "text-unet", 64, 4, "text"),  # SD 1.x: 512x512 images, 64x64 latents, CLIP-L
    ("pixart-digits", "pixart", 16, 1, "text"),
]
TEXT_WIDTH = {"sd15": 768, "pixart-digits": 32}
TEXT_TOKENS = 77


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel saves for its backward: q, k, v, the output and the
    log-sum-exp of each row (FlashAttention), never the T x T scores."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: ANN001, ANN205
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        raise NotImplementedError


def fused_attention(query, key, value, *args, **kwargs):  # noqa: ANN001, ANN201
    """torch's scaled_dot_product_attention by its own argument names (diffusers passes them
    by keyword)."""
    return _FusedAttention.apply(query, key, value)


def build(preset: str, backbone: str, resolution: int, channels: int, condition: str) -> nn.Module:
    from diffusion.networks import build_backbone

    with torch.device("meta"):
        if condition == "text":
            return build_backbone(backbone, preset, resolution, channels,
                                  text_width=TEXT_WIDTH[preset])  # fmt: skip
        classes = 1000 if condition == "classes" else 0
        return build_backbone(backbone, preset, resolution, channels, num_classes=classes)


# Bytes of model state per parameter: fp32 weights, gradients, AdamW's two moments, the EMA;
# DDP adds its gradient buckets (a second copy of the gradients, all-reduced in place).
WEIGHT_BYTES, GRAD_BYTES, ADAMW_BYTES, EMA_BYTES, BUCKET_BYTES = 4, 4, 8, 4, 4
TRAINED_BYTES = WEIGHT_BYTES + GRAD_BYTES + ADAMW_BYTES + EMA_BYTES  # 20: what FSDP2 shards


def ddp_state_bytes(num_params: int) -> int:
    """Model state of a network every parameter of which trains, under DDP: 24 bytes each."""
    return (TRAINED_BYTES + BUCKET_BYTES) * num_params


def fsdp_state_bytes(num_params: int, root: int, largest: int, gpus: int) -> float:
    """Under FSDP2 over `gpus`: each GPU's shard of the 20 bytes per parameter, the root
    unit's bf16 weights (`root` parameters outside any unit, held through the step) and two
    units in flight (`largest` parameters each): bf16 weights, bf16 gradients and the fp32
    copy reduce-scattered."""
    return TRAINED_BYTES * num_params / gpus + 2 * root + 2 * (2 + 2 + 4) * largest


def outermost(units: list[nn.Module]) -> list[nn.Module]:
    """The units not inside another (a DiT's embeddings sit inside its blocks: both units)."""
    inner = {id(m) for u in units for m in u.modules() if m is not u}
    return [u for u in units if id(u) not in inner]


def checkpointed_bytes(act: dict) -> int:
    """Activations with checkpointing per unit (`count_saved`'s count): what is saved outside
    units, every unit's input, and one unit's saved bytes at a time (the largest), recomputed."""
    return act["outside"] + sum(act["inputs"]) + max(act["per_unit"], default=0)


def count_saved(net: nn.Module, units: list[nn.Module], forward: Callable[[], object]) -> dict:
    """Bytes autograd saves for the backward while `forward()` runs `net` (on the meta device:
    no memory, no compute): in all, outside every unit and inside each unit (its own, outside
    any unit nested in it is not a case here), and each unit's input; each storage once.
    Parameters are left out of those; `params_outside` and `params_per_unit` count the
    parameters autograd saves (what autocast's lower-precision copy of each would weigh, at
    the network's dtype, where the weights are kept in float32)."""
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, unit index)
    saved_params: dict[int, tuple[int, int | None]] = {}
    current: list[int] = []
    inputs: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        into = saved_params if key in params else saved
        if key not in into:
            into[key] = (t.untyped_storage().nbytes(), current[-1] if current else None)
        return t

    def enter(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            current.append(index)
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            inputs[index] = max(inputs.get(index, 0), 0 if first is None else
                                first.numel() * first.element_size())  # fmt: skip

        return hook

    def leave(*_: object) -> None:  # a forward hook returning a value replaces the output
        current.pop()

    handles = []
    for i, unit in enumerate(units):
        handles.append(unit.register_forward_pre_hook(enter(i)))
        handles.append(unit.register_forward_hook(leave))
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()

    def split(found: dict[int, tuple[int, int | None]]) -> tuple[int, list[int]]:
        per_unit = [0] * len(units)
        outside = 0
        for size, unit in found.values():
            if unit is None:
                outside += size
            else:
                per_unit[unit] += size
        return outside, per_unit

    outside, per_unit = split(saved)
    params_outside, params_per_unit = split(saved_params)
    return {"all": outside + sum(per_unit), "outside": outside, "per_unit": per_unit,
            "inputs": [inputs.get(i, 0) for i in range(len(units))],
            "params_outside": params_outside, "params_per_unit": params_per_unit}  # fmt: skip


def saved_bytes(
    net: nn.Module, units: list[nn.Module], batch: int, condition: str, text_width: int
) -> dict:
    """`count_saved` for one forward of a preset at `batch` (meta device, bf16 inputs)."""
    from diffusion.networks import backbone_of, sample_shape

    channels, height, width = sample_shape(net)
    x = torch.empty(batch, channels, height, width, device="meta", dtype=torch.bfloat16)
    x.requires_grad_(True)
    t = torch.zeros(batch, device="meta")
    if condition == "text":
        condition_args = {"encoder_hidden_states": torch.empty(
            batch, TEXT_TOKENS, text_width, device="meta", dtype=torch.bfloat16)}  # fmt: skip
        if backbone_of(net).name == "pixart":
            condition_args["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    elif backbone_of(net).name == "dit":
        condition_args = {"class_labels": torch.zeros(batch, dtype=torch.long, device="meta")}
    else:
        condition_args = {}
    return count_saved(net, units, lambda: net(x, timestep=t, **condition_args))


def table(args: argparse.Namespace) -> None:
    from diffusion.networks import BACKBONES

    rows = []
    for preset, backbone, resolution, channels, condition in PRESETS:
        net = build(preset, backbone, resolution, channels, condition).to(torch.bfloat16)
        names = set(BACKBONES[backbone].shard_units(net))
        units = [m for m in net.modules() if type(m).__name__ in names]
        outer = outermost(units)
        num_params = sum(p.numel() for p in net.parameters())
        root = num_params - sum(p.numel() for u in outer for p in u.parameters())
        largest = max(sum(p.numel() for p in u.parameters()) for u in units)
        act = saved_bytes(net, outer, args.batch_size, condition, TEXT_WIDTH.get(preset, 0))
        ac = checkpointed_bytes(act)
        ddp_state = ddp_state_bytes(num_params)
        fsdp_state = fsdp_state_bytes(num_params, root, largest, args.gpus)
        rows.append([
            preset, f"{resolution}x{resolution}x{channels}", f"{num_params / 1e6:,.1f}M",
            ddp_state / GiB, fsdp_state / GiB, act["all"] / GiB, ac / GiB,
            (ddp_state + act["all"]) / GiB, (fsdp_state + act["all"]) / GiB,
            (fsdp_state + ac) / GiB,
        ])  # fmt: skip
    print(f"per GPU, GiB; {args.gpus} GPUs, batch {args.batch_size} per GPU, bf16 compute; "
          f"arithmetic at {git_revision()}")  # fmt: skip
    print_table(
        ["preset", "input", "parameters", "state DDP", f"state FSDP2/{args.gpus}",
         "activations", "activations, checkpointed", "DDP", "FSDP2", "FSDP2 + checkpointing"],
        rows,
    )  # fmt: skip


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    status = Path("/proc/self/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def train_tracking_memory(argv: list[str]) -> dict[str, int]:
    """Run `train_ddpm.main(argv)` in this process; bytes of: its peak resident memory
    (ru_maxrss) as of the last optimizer step (`training`: set-up and training) and at the
    end (`end`: the checkpoint save and the export too), its resident memory when the network
    is handed to Accelerate (`prepared`: set-up done, before any gradient, optimizer or EMA
    state) and its highest at the end of a training forward (`forward`: the activations
    held, the gradients not yet), and on a GPU its peak allocated GPU memory as of the last step (`gpu`)."""
    import train_ddpm
    from ddp_utils import loop
    from ddp_utils.run import Run

    peaks = {"training": 0, "end": 0, "prepared": 0, "forward": 0, "gpu": 0}
    step, prepare = loop.optimizer_step, Run.prepare

    def optimizer_step(*step_args: object, **kwargs: object) -> torch.Tensor:
        ok = step(*step_args, **kwargs)
        peaks["training"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if torch.cuda.is_available():  # what the GPU held at most, set-up and training
            peaks["gpu"] = torch.cuda.max_memory_allocated()
        return ok

    def forward_done(module: nn.Module, args: object, output: object) -> None:
        if torch.is_grad_enabled():  # training's, not the grids'
            peaks["forward"] = max(peaks["forward"], resident_bytes())

    def prepared(self: Run, model: nn.Module, *prepare_args: object, **kwargs: object) -> object:
        peaks["prepared"] = resident_bytes()
        model.register_forward_hook(forward_done)
        return prepare(self, model, *prepare_args, **kwargs)

    loop.optimizer_step, Run.prepare = optimizer_step, prepared
    try:
        train_ddpm.main(argv)
    finally:
        loop.optimizer_step, Run.prepare = step, prepare
    peaks["end"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peaks


def measure(args: argparse.Namespace) -> None:
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="sharding_memory_"))
    argv = [
        "--backbone", "dit", "--preset", args.preset, "--class-conditional",
        "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
        "--max-steps", str(args.steps), "--log-every", "1", "--checkpoint-every", "100000",
        "--sample-every", "0", "--num-sample-images", "1", "--sample-steps", "1",
        "--report-to", "none", "--resume", "none", "--output-dir", str(out),
        "--sharding", args.sharding, "--mixed-precision", args.mixed_precision,
    ]  # fmt: skip
    peaks = train_tracking_memory(argv)
    rank = int(os.environ.get("RANK", "0"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [args.batch_size * int(os.environ.get("WORLD_SIZE", "1")) / r["images_per_s"]
                for r in rows[1:]]  # fmt: skip
    print(json.dumps({
        "rank": rank, "sharding": args.sharding, "preset": args.preset,
        "peak_rss_gib_training": round(peaks["training"] / GiB, 3),
        "peak_rss_gib_end": round(peaks["end"] / GiB, 3),
        "step_s": round(sum(per_step) / len(per_step), 3),
        **({"peak_gpu_gib_training": round(peaks["gpu"] / GiB, 3)} if peaks["gpu"] else {}),
        "machine": machine(), "revision": git_revision(),
    }), flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="per-GPU memory of every preset, by arithmetic")
    t.add_argument("--gpus", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=32, help="per GPU")
    m = sub.add_parser("measure", help="train a few steps; peak memory and step time")
    m.add_argument("--preset", default="dit-b-2")
    m.add_argument("--resolution", type=int, default=32)
    m.add_argument("--batch-size", type=int, default=2, help="per process")
    m.add_argument("--steps", type=int, default=4)
    m.add_argument("--sharding", choices=["none", "fsdp"], default="fsdp")
    m.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    m.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    {"table": table, "measure": measure}[args.command](args)


if __name__ == "__main__":
    main()
