"""Tiny real runs shared by the tests of train_ddpm.py and sample.py (trained once per session).

The UNet is ~180k parameters at 8x8 (the digits' native size), so a 6-step run, its grids and
its export take a few seconds on one CPU thread. Runs happen in-process where one process is
enough (no import cost) and through `accelerate launch` only where two processes are the point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "accelerate_configs" / "cpu_2proc.yaml"

TINY_UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
RESOLUTION = 8
NUM_IMAGES = 32  # training images; also the FID reference (statistics cached once)
MAX_STEPS = 6
GLOBAL_BATCH = 8

_CACHE: dict[str, Path] = {}


def fresh_accelerate_state() -> None:
    """Forget the Accelerate singletons a previous in-process run left behind."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def ddpm_args(
    output_dir: Path, preset: Path, per_device_batch: int, accumulation: int
) -> list[str]:
    """One tiny DDPM recipe; the LR schedule (warmup 2, then cosine) changes at every step."""
    return [
        f"--output-dir={output_dir}",
        f"--preset={preset}",
        f"--resolution={RESOLUTION}",
        f"--max-images={NUM_IMAGES}",
        f"--max-steps={MAX_STEPS}",
        f"--batch-size={per_device_batch}",
        f"--gradient-accumulation-steps={accumulation}",
        "--lr-warmup-steps=2",
        "--lr-schedule=cosine",
        "--log-every=1",
        "--checkpoint-every=3",
        "--sample-every=3",
        "--sample-steps=4",
        "--num-sample-images=8",
    ]


def tiny_preset(folder: Path) -> Path:
    path = folder / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


def trained_ddpm(tmp_path_factory) -> Path:
    """Run dir of a 6-step DDPM run: 1 process x accumulation 2 x batch 4 (global 8)."""
    if "ddpm" not in _CACHE:
        import train_ddpm

        root = tmp_path_factory.mktemp("ddpm_1proc")
        fresh_accelerate_state()
        argv = ddpm_args(root / "run", tiny_preset(root), GLOBAL_BATCH // 2, 2)
        train_ddpm.main([*argv, "--report-to=none"])
        _CACHE["ddpm"] = root / "run"
    return _CACHE["ddpm"]


def trained_edm(tmp_path_factory) -> Path:
    """Run dir of a 6-step EDM run (train_ddpm.py --objective edm), 1 process x batch 8, with
    FID at the last step (so `best/` holds an EDM pipeline too)."""
    if "edm" not in _CACHE:
        import train_ddpm

        root = tmp_path_factory.mktemp("edm_1proc")
        fresh_accelerate_state()
        argv = ddpm_args(root / "run", tiny_preset(root), GLOBAL_BATCH, 1)
        edm = ["--objective=edm", "--sample-steps=3", "--eval-every=6", "--eval-num-samples=8"]
        train_ddpm.main([*argv, *edm, "--report-to=none"])
        _CACHE["edm"] = root / "run"
    return _CACHE["edm"]


def trained_basic(tmp_path_factory) -> Path:
    """Run dir of a 2-step train_basic.py run (its export is `<run>/model`)."""
    if "basic" not in _CACHE:
        import train_basic

        root = tmp_path_factory.mktemp("basic")
        fresh_accelerate_state()
        train_basic.main(
            [
                f"--output-dir={root / 'run'}",
                f"--resolution={RESOLUTION}",
                f"--max-images={NUM_IMAGES}",
                "--max-steps=2",
                "--batch-size=8",
                "--sample-every=0",
                "--num-sample-images=4",
                "--sample-steps=2",
                "--report-to=none",
            ]
        )
        _CACHE["basic"] = root / "run"
    return _CACHE["basic"]


def launch_two_processes(args: list[str], tmp_path: Path, timeout: int = 480) -> str:
    """`accelerate launch` with two CPU processes (gloo); returns the combined log."""
    local = Path(sys.executable).with_name("accelerate")
    accelerate = str(local) if local.exists() else shutil.which("accelerate") or "accelerate"
    env = {
        **os.environ,  # offline flags and the session's private cache (conftest)
        "ACCELERATE_USE_CPU": "true",
        "HF_HOME": str(tmp_path / "hf_home"),  # no user-level accelerate config
        "WANDB_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [accelerate, "launch", "--config_file", str(CPU_2PROC), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
