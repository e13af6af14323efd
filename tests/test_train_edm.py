"""train_ddpm.py --objective edm end to end: files, the export in diffusers alone, flags.

The EDM math itself is tested in test_edm.py; exact resume in test_resume.py; sampling from
EDM exports and checkpoints (1 and 2 processes) in test_sample.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import (
    MAX_STEPS,
    REPO,
    ddpm_args,
    fresh_accelerate_state,
    read_jsonl,
    tiny_preset,
    trained_ddpm,
    trained_edm,
)

import sample
import train_ddpm
from ddp_utils.checkpoint import CheckpointError
from ddp_utils.config import parse_config
from diffusion.kinds.edm import pipeline as edm_pipeline
from diffusion.pipeline_code import shipped_source
from diffusion.sampling import sample_seed

EXPORTED = REPO / "tests" / "scripts" / "exported_pipeline.py"


@pytest.fixture(scope="session")
def edm_run(tmp_path_factory) -> Path:
    return trained_edm(tmp_path_factory)


def test_edm_run_writes_checkpoints_pictures_losses_by_noise_level_and_a_pipeline(
    edm_run: Path,
) -> None:
    state = json.loads((edm_run / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    assert state["task"] == "edm" and state["step"] == MAX_STEPS
    assert state["scheduler_config"]["sigma_data"] == 0.5
    assert state["config"]["sample_scheduler"] == "edm-heun"
    pictures = {p.name for p in (edm_run / "samples").iterdir()}
    assert {
        "forward_noising-0000000.png",
        "samples-0000006.png",
        "denoising-0000006.png",
    } <= pictures
    losses = [r for r in read_jsonl(edm_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, MAX_STEPS + 1))
    bins = [f"loss_sigma_q{q}" for q in range(4)]
    assert all(any(b in r for b in bins) for r in losses)
    assert all(np.isfinite(r[b]) and r[b] > 0 for r in losses for b in bins if b in r)

    pipeline = edm_run / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "EDMPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "EDMEulerScheduler"]
    assert (pipeline / "pipeline.py").read_text() == shipped_source(edm_pipeline)
    assert json.loads((pipeline / "task.json").read_text())["task"] == "edm"
    for path in ("unet/diffusion_pytorch_model.safetensors", "unet_raw/config.json"):
        assert (pipeline / path).is_file(), path
    # --eval-every: FID of EDM samples logged, and the best export is a complete EDM pipeline.
    assert [r["step"] for r in read_jsonl(edm_run / "metrics.jsonl") if "fid" in r] == [6]
    assert (edm_run / "best" / "pipeline.py").read_text() == shipped_source(edm_pipeline)
    assert json.loads((edm_run / "best" / "fid.json").read_text())["num_samples"] == 8


def test_export_runs_in_diffusers_alone_and_reproduces_sample_py(
    edm_run: Path, tmp_path: Path
) -> None:
    """The folder's pipeline.py, loaded by DiffusionPipeline with every module of this toolkit
    blocked, gives sample.py's images for the same seeds, deterministic and with churn."""
    ours = {}
    for churn in ("0.0", "5.0"):
        fresh_accelerate_state()
        flags = ["--num-samples=5", "--num-steps=4", "--seed=7", f"--churn={churn}"]
        argv = [str(edm_run / "pipeline"), f"--output-dir={tmp_path / churn}", *flags]
        ours[churn] = sample.sample(parse_config(sample.SampleConfig, argv))
    seeds = [str(sample_seed(7, k)) for k in range(5)]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(EXPORTED), str(edm_run / "pipeline"), str(tmp_path), "4",
         ",".join(ours), *seeds],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for churn, images in ours.items():
        with np.load(tmp_path / f"churn-{churn}.npz") as npz:
            theirs = npz["arr_0"]
        assert theirs.shape == images.shape == (5, 8, 8, 1)
        assert np.array_equal(theirs, images), churn
        assert images.std() > 0
    assert not np.array_equal(ours["0.0"], ours["5.0"])


def test_an_edm_run_refuses_a_ddpm_checkpoint(tmp_path_factory, tmp_path: Path) -> None:
    shutil.copytree(
        trained_ddpm(tmp_path_factory) / "checkpoints", tmp_path / "run" / "checkpoints"
    )
    fresh_accelerate_state()
    argv = ddpm_args(tmp_path / "run", tiny_preset(tmp_path), 8, 1)
    with pytest.raises(CheckpointError, match="task: checkpoint has 'ddpm', this run has 'edm'"):
        train_ddpm.main([*argv, "--objective=edm", "--report-to=none", "--max-steps=7"])


def test_dry_run_resolves_each_objectives_sampler(capsys: pytest.CaptureFixture) -> None:
    for flags, expected in (
        ([], ("objective: ddpm", "sample_scheduler: ddim", "sample_steps: 50", "sample_eta: 1.0")),
        (["--objective=edm"], ("objective: edm", "sample_scheduler: edm-heun", "sample_steps: 18")),
        (
            ["--sample-scheduler=heun-karras"],
            ("sample_scheduler: heun-karras", "sample_steps: 10", "sample_eta: null"),
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train_ddpm.main([*flags, "--dry-run"])
        assert exit_info.value.code == 0
        printed = capsys.readouterr().out
        for line in expected:
            assert line in printed, (flags, line)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--objective=edm", "--sample-scheduler=ddim"], "--sample-scheduler ddim does not sample"),
        (["--sample-scheduler=edm-heun"], "--sample-scheduler edm-heun does not sample"),
        (["--objective=edm", "--prediction-type=epsilon"], "--prediction-type applies to"),
        (["--objective=edm", "--min-snr-gamma=5"], "--min-snr-gamma applies to"),
        (["--sample-scheduler=unipc", "--sample-eta=1"], "--sample-eta applies to"),
        (["--objective=edm", "--sigma-min=100"], "--sigma-min and --sigma-max"),
        (["--objective=edm", "--p-std=0"], "--p-std must be > 0"),
        (["--objective=diffusion"], "--objective"),
    ],
)
def test_bad_edm_and_sampler_flags_are_named(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main([*flags, "--dry-run"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
