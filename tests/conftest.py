"""Shared test setup: offline hub and wandb, one torch thread, a private dataset cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Set before any test imports datasets/wandb, and inherited by the subprocesses tests launch.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores shared by several processes: more threads only make each process stall.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ddp_diffusion_cache")
    old = os.environ.get("DDP_DIFFUSION_CACHE")
    os.environ["DDP_DIFFUSION_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DDP_DIFFUSION_CACHE", None)
    else:
        os.environ["DDP_DIFFUSION_CACHE"] = old


PYTHON = sys.executable
