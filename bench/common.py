"""Shared bits of the benchmark scripts: FLOP counting, peak estimates, table printing, and a
classifier of the real digits that reads the class of generated ones."""

from __future__ import annotations

import functools
import platform
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

# Dense bf16 tensor-core peaks from the vendors' spec sheets (TFLOP/s, no sparsity).
GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "4090": 165.2}


def machine() -> str:
    """One line naming the machine the figures came from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "cpu"
    cores = len(__import__("os").sched_getaffinity(0))
    return f"{cpu}, {cores} cores (torch {torch.__version__})"


def git_revision() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tree_state() -> str:
    """'clean tree', or 'uncommitted changes' (to tracked files): what the figures belong to."""
    try:
        dirty = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no"], text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return "uncommitted changes" if dirty else "clean tree"


def train_flops_per_image(
    model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]
) -> float:
    """FLOPs of one forward + backward for one image, counted by torch.utils.flop_counter."""
    x = torch.randn(1, *shape, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        forward(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device) -> tuple[float, str]:
    """The peak to divide by for MFU, and where it came from.

    GPUs: the spec sheet's dense bf16 figure. CPUs have no such published figure here, so
    we measure a large fp32 matmul: MFU on CPU reads "fraction of what this CPU's BLAS reaches".
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{key} dense bf16 spec"
        return float("nan"), f"unknown GPU {name}"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    seconds = (time.perf_counter() - start) / reps
    return 2 * n**3 / seconds / 1e12, "measured fp32 1024^3 matmul"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def print_table(header: list[str], rows: list[list[object]]) -> None:
    """A Markdown table, so the output pastes straight into BENCHMARKS.md."""

    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(fmt(v) for v in row) + " |")


@functools.cache
def _digits_classifier() -> LogisticRegression:
    """Fitted once per process (about a second); sklearn is imported only by the scripts that
    read digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits  # sklearn's dependency

    digits = load_digits()
    with threadpool_limits(1):  # BLAS sums by thread count: a borderline digit could flip
        return LogisticRegression(max_iter=3000).fit(digits.data, digits.target)


def digit_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
    """Share of NHWC uint8 images a logistic regression fitted on the 8x8 real digits (97% on
    them) assigns to `labels`; larger images are averaged down to 8x8 first. Fitted and run
    on one BLAS thread, so the figure does not depend on OMP_NUM_THREADS."""
    x = torch.from_numpy(images[..., 0]).float()[:, None]
    x = torch.nn.functional.adaptive_avg_pool2d(x, 8)[:, 0].reshape(len(images), -1)
    from threadpoolctl import threadpool_limits  # sklearn's dependency

    with threadpool_limits(1):
        predicted = _digits_classifier().predict(x.numpy() / 255 * 16)
    return float((predicted == labels).mean())
