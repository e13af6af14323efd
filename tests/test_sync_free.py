"""The training step reads nothing on the host between log windows, and a skipped step is a
no-op on the device: what lets a GPU run ahead of the Python loop.

On a machine with a GPU (bench/gpu_suite.sh runs this file there) the run trains on CUDA and
every step also runs under `torch.cuda.set_sync_debug_mode("error")`."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_ddpm
from ddp_utils import loop
from ddp_utils.ema import EMA
from ddp_utils.guard import guarded_step
from ddp_utils.optim import make_optimizer
from tests.tiny_runs import NUM_IMAGES, RESOLUTION, fresh_accelerate_state, tiny_preset


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: `item()`, `bool()`, `float()`, `int()` all
    dispatch `aten._local_scalar_dense`; `tolist()`/`numpy()` are patched on top."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def names_a_device(args: tuple, kwargs: dict) -> bool:
    """Does a `Tensor.to(...)` call move the tensor to a device (not just change its dtype)?"""
    if "device" in kwargs:
        return True
    return any(isinstance(a, str | torch.device) or type(a) is torch.Tensor for a in args)


@contextlib.contextmanager
def counting(reads: list[str], monkeypatch: pytest.MonkeyPatch, moves: list[str] | None = None):
    """Count host reads in the block; on a GPU, any synchronising CUDA call also raises.

    `moves` collects the callers of `Tensor.to(device)` / `.cuda()` outside torch itself: a
    copy from pageable host memory to a GPU waits for the kernels queued before it. On a CPU
    the copy is a no-op, so the calls themselves are counted, which makes it checkable here."""
    mode = HostReads()
    if moves is not None:
        real_to = torch.Tensor.to

        def spy_to(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            # torch's own calls (clip_grad_norm_'s norms to the first grad's device) move
            # nothing between host and device; the project's and diffusers' calls might.
            if names_a_device(args, kwargs) and f"{os.sep}torch{os.sep}" not in caller.co_filename:
                moves.append(caller.co_name)
            return real_to(self, *args, **kwargs)

        def spy_cuda(self, *args, **kwargs):
            moves.append(sys._getframe(1).f_code.co_name)
            return torch.Tensor.cuda.__wrapped__(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", spy_to)
        spy_cuda.__wrapped__ = torch.Tensor.cuda
        monkeypatch.setattr(torch.Tensor, "cuda", spy_cuda)
    for name in ("tolist", "numpy", "__array__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")
    try:
        with mode:
            yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
        reads.extend(mode.reads)


def test_no_host_read_inside_the_step_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every optimizer step (data, loss, backward, clipping, guard, update, EMA, metrics) of a
    real train_ddpm.py run, 2 micro-batches each, runs with zero host reads; the reads happen
    at the boundaries (every --log-every steps) only. Nothing is moved to the device inside a
    step either (tables such as min-SNR's are built at setup), except each epoch's order of
    the images, once per epoch."""
    per_step: list[int] = []
    moves_per_step: list[list[str]] = []
    real_step, real_ema_update = loop.optimizer_step, EMA.update

    def counted_step(*args, **kwargs):
        reads: list[str] = []
        moves: list[str] = []
        with counting(reads, pytest.MonkeyPatch(), moves):
            ok = real_step(*args, **kwargs)
        per_step.append(len(reads))
        moves_per_step.append(moves)
        assert not reads, reads
        return ok

    def counted_ema(self, *args, **kwargs):
        reads: list[str] = []
        with counting(reads, pytest.MonkeyPatch()):
            real_ema_update(self, *args, **kwargs)
        assert not reads, reads

    checks: list[int] = []
    real_check = loop.Run.check

    def counted_check(self, step):
        checks.append(step)
        return real_check(self, step)

    monkeypatch.setattr(loop, "optimizer_step", counted_step)
    monkeypatch.setattr(EMA, "update", counted_ema)
    monkeypatch.setattr(loop.Run, "check", counted_check)
    fresh_accelerate_state()
    train_ddpm.main(
        [
            f"--output-dir={tmp_path / 'run'}",
            f"--preset={tiny_preset(tmp_path)}",
            f"--resolution={RESOLUTION}",
            f"--max-images={NUM_IMAGES}",
            "--max-steps=8",
            "--batch-size=4",
            "--gradient-accumulation-steps=2",
            "--random-flip",
            "--min-snr-gamma=5",
            "--log-every=4",
            "--checkpoint-every=8",
            "--sample-every=0",
            "--num-sample-images=2",
            "--sample-steps=1",
            "--report-to=none",
        ]
    )
    assert per_step == [0] * 8
    assert checks == [4, 8]  # the only places the host learns what the device decided
    # 32 images, 8 per step: a new epoch (one copy of its order) every 4 steps, nothing else.
    assert moves_per_step == [["epoch_order"], [], [], [], ["epoch_order"], [], [], []]


def test_a_skipped_step_changes_no_weight_moment_step_count_or_ema() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer("adamw", model.parameters(), 0.1, 0.01)
    ema = EMA(model, 0.9)

    def train_step(ok: bool) -> None:
        model(torch.randn(2, 4)).square().mean().backward()
        keep = torch.tensor(ok)
        guarded_step(optimizer, keep, None)
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, 1, keep=keep)

    train_step(True)
    before = snapshot(model, optimizer, ema)
    train_step(False)
    assert_same(before, snapshot(model, optimizer, ema))
    train_step(True)
    after = snapshot(model, optimizer, ema)
    assert all(not torch.equal(a, b) for a, b in zip(before["weights"], after["weights"]))
    assert after["steps"] == [2.0, 2.0]


def test_under_an_fp16_grad_scaler_a_skip_goes_through_its_found_inf() -> None:
    """CPU stand-in for the fp16 path (Accelerate has no GradScaler on CPU): a non-finite loss
    with finite gradients is skipped through the scaler, which then lowers its scale once, and
    the next step updates normally."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = make_optimizer("adam", model.parameters(), 0.1, 0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fresh_accelerate_state()
    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)

    def train_step(ok: bool, clip: bool) -> None:
        scaler.scale(model(torch.ones(2, 4)).mean()).backward()
        if clip:
            scaler.unscale_(optimizer)  # what accelerator.clip_grad_norm_ does under fp16
        guarded_step(wrapped, torch.tensor(ok), scaler)  # its step runs scaler.step + update
        optimizer.zero_grad(set_to_none=True)

    train_step(True, clip=True)
    before = snapshot(model, optimizer, None)
    for clip in (True, False):
        train_step(False, clip=clip)
        assert_same(before, snapshot(model, optimizer, None))
    assert scaler.get_scale() == 256.0  # lowered once per skipped step
    train_step(True, clip=False)
    assert not torch.equal(before["weights"][0], model.weight)


def snapshot(model, optimizer, ema) -> dict:
    state = optimizer.state_dict()["state"]
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "moments": [v.clone() for s in state.values() for k, v in s.items() if k != "step"],
        "steps": [float(s["step"]) for s in state.values()],
        "ema": [] if ema is None else [t.clone() for t in ema.state_dict().values()],
    }


def assert_same(a: dict, b: dict) -> None:
    for key in ("weights", "moments", "ema"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True)), key
    assert a["steps"] == b["steps"]
