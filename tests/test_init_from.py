"""Starting from models made elsewhere: folders written by diffusers itself, hub ids (from the
hub cache, offline), our own exports; what train_ddpm.py --init-from and sample.py accept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

import sample
from ddp_utils.config import parse_config
from ddp_utils.errors import InputError
from tests.tiny_runs import (
    CPU_2PROC,
    NUM_IMAGES,
    RESOLUTION,
    TINY_UNET,
    fresh_accelerate_state,
    trained_edm,
)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_pipeline(
    folder: Path, resolution: int = RESOLUTION, seed: int = 3, beta_schedule: str = "linear"
) -> Path:
    """A DDPMPipeline folder written by diffusers' own save_pretrained, as its training example
    leaves it: a linear schedule (not the toolkit's cosine), random weights."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=resolution, in_channels=1, out_channels=1, **TINY_UNET)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def as_hub_cache(pipeline: Path, cache: Path, repo_id: str) -> None:
    """Put a folder where huggingface_hub keeps a downloaded snapshot of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(pipeline, storage / "snapshots" / commit)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)


def train(argv: list[str]) -> None:
    import train_ddpm

    fresh_accelerate_state()
    train_ddpm.main([*argv, "--report-to=none"])


def run_args(out: Path, *extra: str) -> list[str]:
    return [
        f"--output-dir={out}",
        f"--resolution={RESOLUTION}",
        f"--max-images={NUM_IMAGES}",
        "--batch-size=4",
        "--max-steps=1",
        "--learning-rate=1e-9",
        "--lr-warmup-steps=0",
        "--sample-every=0",
        "--sample-steps=2",
        "--num-sample-images=2",
        "--checkpoint-every=1",
        *extra,
    ]


def python(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_fine_tuning_starts_from_a_folder_diffusers_wrote_and_takes_its_schedule(tmp_path):
    source = diffusers_pipeline(tmp_path / "from-diffusers")
    # Configs older than `prediction_type` (google/ddpm-cifar10-32's) mean diffusers' epsilon.
    scheduler_file = source / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_file.read_text())
    del config["prediction_type"]
    scheduler_file.write_text(json.dumps(config))
    start = load_file(source / "unet" / WEIGHTS)
    train(run_args(tmp_path / "run", f"--init-from={source}"))
    run = tmp_path / "run"
    after = load_file(run / "pipeline" / "unet_raw" / WEIGHTS)
    # One step at lr 1e-9 moves nothing visibly: the run started from diffusers' weights.
    assert after.keys() == start.keys()
    assert all(torch.allclose(after[k], start[k], atol=1e-6) for k in start)
    # The schedule came with the model (linear betas), and is what the export carries.
    config = (run / "config.yaml").read_text()
    assert "beta_schedule: linear" in config and f"init_from: {source}" in config
    assert "prediction_type: epsilon" in config
    exported = DDPMPipeline.from_pretrained(run / "pipeline", use_safetensors=True)
    assert exported.scheduler.config.beta_schedule == "linear"
    # Rerun without the source and without schedule flags: the checkpoint's schedule (linear),
    # not the defaults (cosine, which the resume would refuse as another model).
    shutil.rmtree(source)
    train(run_args(run, f"--init-from={source}", "--max-steps=2"))
    assert "beta_schedule: linear" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    # A fresh network (no --init-from) starts elsewhere: the comparison above can fail.
    train(run_args(tmp_path / "fresh"))
    fresh = load_file(tmp_path / "fresh" / "pipeline" / "unet_raw" / WEIGHTS)
    assert fresh.keys() != start.keys() or not all(
        torch.allclose(fresh[k], start[k], atol=1e-6) for k in start
    )


def test_a_flag_given_overrides_the_models_schedule_and_resume_wins(tmp_path):
    source = diffusers_pipeline(tmp_path / "from-diffusers")
    run = tmp_path / "run"
    train(run_args(run, f"--init-from={source}", "--beta-schedule=squaredcos_cap_v2"))
    assert "beta_schedule: squaredcos_cap_v2" in (run / "config.yaml").read_text()
    # Once the run has a checkpoint it resumes from it: the source is not even read.
    shutil.rmtree(source)
    argv = run_args(run, f"--init-from={source}", "--beta-schedule=squaredcos_cap_v2")
    train([a if not a.startswith("--max-steps") else "--max-steps=2" for a in argv])
    assert (run / "checkpoints" / "checkpoint-2").is_dir()


def test_a_model_that_cannot_start_the_run_is_refused_with_the_fix(tmp_path, capsys):
    source = diffusers_pipeline(tmp_path / "32px", resolution=2 * RESOLUTION)
    with pytest.raises(InputError, match=rf"(?s)--init-from: .*pass --resolution {2 * RESOLUTION}"):
        train(run_args(tmp_path / "run", f"--init-from={source}"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(InputError, match="pass --objective ddpm"):
        train(run_args(tmp_path / "edm", f"--init-from={source}", "--objective=edm"))
    with pytest.raises(SystemExit):  # a config error: exit 2 with the message
        train(run_args(tmp_path / "both", f"--init-from={source}", "--preset=digits-small"))
    assert "--preset and --init-from both choose the network" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"--init-from: no/such-model is a hub id, the hub is "):
        train(run_args(tmp_path / "hub", "--init-from=no/such-model"))
    with pytest.raises(InputError, match="--init-from: ./missing does not exist"):
        train(run_args(tmp_path / "typo", "--init-from=./missing"))
    diverged = diffusers_pipeline(tmp_path / "diverged")
    weights = load_file(diverged / "unet" / WEIGHTS)
    save_file({k: v * float("nan") for k, v in weights.items()}, diverged / "unet" / WEIGHTS)
    with pytest.raises(InputError, match="(?s)--init-from: .*its weights hold non-finite values"):
        train(run_args(tmp_path / "diverged-run", f"--init-from={diverged}"))
    assert not (tmp_path / "diverged-run").exists()
    sigmoid = diffusers_pipeline(tmp_path / "sigmoid", beta_schedule="sigmoid")
    with pytest.raises(InputError, match="its beta_schedule is 'sigmoid' .*Give --beta-sch"):
        train(run_args(tmp_path / "sigmoid-run", f"--init-from={sigmoid}"))


def test_an_edm_export_fine_tunes_as_edm(tmp_path_factory, tmp_path):
    source = trained_edm(tmp_path_factory) / "pipeline"
    with pytest.raises(InputError, match="was trained with --sigma-data 0.5: pass it"):
        train(run_args(tmp_path / "sd", f"--init-from={source}", "--objective=edm",
                       "--sigma-data=0.7"))  # fmt: skip
    args = [a for a in run_args(tmp_path / "run", f"--init-from={source}", "--objective=edm")]
    train(args)
    start = load_file(source / "unet" / WEIGHTS)
    after = load_file(tmp_path / "run" / "pipeline" / "unet_raw" / WEIGHTS)
    assert all(torch.allclose(after[k], start[k], atol=1e-6) for k in start)


def test_sample_reads_diffusers_folders_and_cached_hub_ids_offline(tmp_path, monkeypatch):
    """sample.py on a pipeline folder, a UNet2DModel folder, an early flat repo and a hub id
    in the cache (in this process: the same code as the command), and the command's refusals
    (exit 2, no traceback) of a pickle and of a hub id missing offline."""
    pipeline = diffusers_pipeline(tmp_path / "pipeline")
    unet_only = tmp_path / "unet-only"
    UNet2DModel.from_pretrained(pipeline / "unet", use_safetensors=True).save_pretrained(unet_only)
    flat = tmp_path / "flat"  # early hub repos (google/ddpm-cifar10-32): configs side by side
    shutil.copytree(pipeline / "unet", flat)
    shutil.copy(pipeline / "scheduler" / "scheduler_config.json", flat)
    shutil.copy(pipeline / "model_index.json", flat)
    cache = tmp_path / "hub"
    as_hub_cache(pipeline, cache, "someone/tiny-ddpm")
    outputs = {}
    sources = {"folder": pipeline, "unet": unet_only, "flat": flat, "hub": "someone/tiny-ddpm"}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name, source in sources.items():
        out = tmp_path / f"out-{name}"
        fresh_accelerate_state()
        sample.sample(parse_config(sample.SampleConfig, [
            str(source), "--num-samples=2", "--num-inference-steps=3", f"--output-dir={out}",
        ]))  # fmt: skip
        with np.load(out / "samples.npz") as npz:
            outputs[name] = npz["arr_0"].tobytes()
    assert outputs["folder"] == outputs["hub"]  # the same files, found through the cache
    assert outputs["folder"] == outputs["flat"]  # the same network and schedule
    pickled = tmp_path / "pickled"  # weights only as diffusion_pytorch_model.bin
    UNet2DModel.from_pretrained(unet_only, use_safetensors=True).save_pretrained(
        pickled, safe_serialization=False
    )
    refused = python("sample.py", str(pickled), f"--output-dir={tmp_path / 'p'}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "only as diffusion_pytorch_model.bin (a pickle" in refused.stderr
    missing = python("sample.py", "nobody/not-cached", f"--output-dir={tmp_path / 'x'}",
                     HF_HUB_CACHE=str(cache))  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "the hub is offline here (HF_HUB_OFFLINE=1) and it is not in the local cache" in (
        missing.stderr
    )


def test_two_processes_stop_together_on_a_hub_id_the_main_process_cannot_get(tmp_path):
    """The main process resolves the hub id first; when it fails, the other rank stops with a
    message too (no traceback, no wait for a download that will never come)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(CPU_2PROC), "sample.py",
         "nobody/not-cached", f"--output-dir={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
             "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf_home")},
    )  # fmt: skip
    assert result.returncode != 0
    # The launcher prints its own ChildFailedError traceback; the workers print none.
    assert 'sample.py", line' not in result.stderr, result.stderr[-3000:]
    assert "error: nobody/not-cached is a hub id, the hub is offline here" in result.stderr
    assert "error: nobody/not-cached could not be found (the main process says why)" in (
        result.stderr
    )
