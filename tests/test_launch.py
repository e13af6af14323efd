"""`accelerate launch` with this repo's configs on a machine without a GPU: the configs work as
they read, and what cannot work says so (before any step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_basic
from ddp_utils.distributed import check_world_size, prepare_launch
from ddp_utils.errors import InputError
from tests.tiny_runs import CPU_2PROC, NUM_IMAGES, REPO, RESOLUTION, fresh_accelerate_state

TINY_BASIC = [
    f"--resolution={RESOLUTION}",
    f"--max-images={NUM_IMAGES}",
    "--max-steps=1",
    "--batch-size=4",
    "--sample-every=0",
    "--num-sample-images=4",
    "--sample-steps=2",
    "--report-to=none",
]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "ACCELERATE_USE_CPU", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_n_processes_without_a_gpu_are_cpu_processes(no_gpu):
    no_gpu.setenv("WORLD_SIZE", "2")  # the multi-process launcher drops `use_cpu: true`
    (warning,) = prepare_launch()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    assert "no GPU here: the 2 processes run on the CPU over gloo" in warning


def test_plain_python_on_a_cpu_says_nothing(no_gpu):
    assert prepare_launch() == []
    assert "ACCELERATE_USE_CPU" not in os.environ


def test_processes_that_did_not_find_each_other_stop_naming_the_fix(no_gpu):
    no_gpu.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="started 2 processes but Accelerate set up 1") as info:
        check_world_size(1)
    assert "ACCELERATE_USE_CPU=true" in str(info.value)
    check_world_size(2)


def test_a_gpu_config_without_a_gpu_warns_before_training_on_the_cpu(no_gpu, tmp_path, capsys):
    # What the launcher exports for accelerate_configs/single_gpu.yaml (gpu_ids "0").
    no_gpu.setenv("ACCELERATE_USE_CPU", "False")
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", "0")
    fresh_accelerate_state()
    train_basic.main([f"--output-dir={tmp_path / 'run'}", *TINY_BASIC])
    out = capsys.readouterr().out
    assert "warning: accelerate launch without --cpu or `use_cpu: true` (gpu_ids" in out
    assert "torch sees no GPU" in out and "training on the CPU" in out


@pytest.mark.slow
@pytest.mark.skipif(torch.accelerator.is_available(), reason="the no-GPU launch")
def test_cpu_2proc_config_without_the_environment_variable_runs_two_processes(tmp_path):
    """The README's 2-process CPU command, without ACCELERATE_USE_CPU=true (the config file
    says `use_cpu: true`): one run of two processes, not two runs fighting over one folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "WORLD_SIZE")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(CPU_2PROC), "train_basic.py",
         f"--output-dir={tmp_path / 'run'}", *TINY_BASIC],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "per device 4 x 2 processes" in log
    assert "the 2 processes run on the CPU over gloo" in log
    assert (tmp_path / "run" / "model").is_dir()
