"""sample.py: basic, DDPM and EDM models, exports and checkpoints, samplers, 1 vs 2 processes,
--fid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_runs import (
    NUM_IMAGES,
    RESOLUTION,
    fresh_accelerate_state,
    launch_two_processes,
    trained_basic,
    trained_ddpm,
    trained_edm,
)

import sample
from ddp_utils.config import parse_config
from ddp_utils.errors import CheckpointError, InputError

BAD_INPUT = (InputError, CheckpointError)  # what cli_main turns into exit 2 (a ValueError: exit 1)


@pytest.fixture(scope="session")
def ddpm_run(tmp_path_factory) -> Path:
    return trained_ddpm(tmp_path_factory)


@pytest.fixture(scope="session")
def edm_run(tmp_path_factory) -> Path:
    return trained_edm(tmp_path_factory)


@pytest.fixture(scope="session")
def basic_run(tmp_path_factory) -> Path:
    return trained_basic(tmp_path_factory)


def run_sample(model_path: Path, out: Path, *flags: str) -> np.ndarray:
    """sample.py in this process; returns the array it wrote to samples.npz (checked equal)."""
    fresh_accelerate_state()
    images = sample.sample(
        parse_config(sample.SampleConfig, [str(model_path), f"--output-dir={out}", *flags])
    )
    with np.load(out / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], images)
    return images


def test_basic_export_gives_npz_and_grid(basic_run: Path, tmp_path: Path) -> None:
    images = run_sample(basic_run / "model", tmp_path / "a", "--num-samples=5", "--batch-size=2")
    assert images.dtype == np.uint8 and images.shape == (5, RESOLUTION, RESOLUTION, 1)
    assert images.std() > 0
    with Image.open(tmp_path / "a" / "grid.png") as grid:
        assert grid.size[0] > RESOLUTION
    info = json.loads((tmp_path / "a" / "sample_info.json").read_text())
    assert info["task"] == "basic" and info["num_steps"] == 40
    # The run directory resolves to the same export; the batch size changes nothing.
    again = run_sample(basic_run, tmp_path / "b", "--num-samples=5", "--batch-size=5")
    assert np.array_equal(images, again)
    # Its one sampler has no name and no knobs: naming one is refused, not ignored.
    with pytest.raises(BAD_INPUT, match="basic models .* have one sampler, without knobs: drop "
                       "--scheduler, --eta"):  # fmt: skip
        run_sample(basic_run, tmp_path / "c", "--scheduler=ddim", "--eta=1")


def test_ddpm_pipeline_and_checkpoint_give_the_same_images_per_weights(
    ddpm_run: Path, tmp_path: Path
) -> None:
    common = ("--num-samples=4", "--num-steps=3")
    checkpoint = ddpm_run / "checkpoints"  # resolves to its latest intact checkpoint
    results = {
        (source, weights): run_sample(
            path, tmp_path / f"{source}-{weights}", *common, f"--weights={weights}"
        )
        for source, path in (("pipeline", ddpm_run / "pipeline"), ("checkpoint", checkpoint))
        for weights in ("ema", "raw")
    }
    assert results["pipeline", "ema"].shape == (4, RESOLUTION, RESOLUTION, 1)
    for weights in ("ema", "raw"):
        assert np.array_equal(results["pipeline", weights], results["checkpoint", weights])
    assert not np.array_equal(results["pipeline", "ema"], results["pipeline", "raw"])
    info = json.loads((tmp_path / "checkpoint-ema" / "sample_info.json").read_text())
    assert Path(info["source"]).name == "checkpoint-6"


def test_every_scheduler_samples_and_saves_its_progression(ddpm_run: Path, tmp_path: Path) -> None:
    pipeline = ddpm_run / "pipeline"
    common = ("--num-samples=3", "--num-steps=4", "--save-progression")
    out = {}
    for name, flags in {
        "ddpm": ("--scheduler=ddpm",),
        "ddim": ("--scheduler=ddim", "--eta=0"),
        "ddim-again": ("--scheduler=ddim", "--eta=0"),
        "ddim-eta1": ("--scheduler=ddim", "--eta=1"),
        "default": (),  # DDIM with eta 1
        "dpm-solver": ("--scheduler=dpm-solver",),
        "unipc": ("--scheduler=unipc",),
        "dpm-solver-3m-karras": ("--scheduler=dpm-solver-3m-karras",),
        "euler-karras": ("--scheduler=euler-karras",),
    }.items():
        out[name] = run_sample(pipeline, tmp_path / name, *common, *flags)
        with Image.open(tmp_path / name / "progression.png") as strip:
            # 4 snapshots (one per step) of up to 8 samples: 4 rows of 3 tiles.
            # 4 rows (steps) x 3 columns (samples), upscaled by 13 (nearest) to a viewable size.
            assert strip.size == (13 * (3 * (RESOLUTION + 2) + 2), 13 * (4 * (RESOLUTION + 2) + 2))
    assert np.array_equal(out["ddim"], out["ddim-again"])  # eta = 0: deterministic for a seed
    assert np.array_equal(out["default"], out["ddim-eta1"])
    # (The 6-step model saturates most pixels; the samplers themselves are compared with
    # diffusers in test_sampling.py.)
    for a, b in (("ddpm", "ddim"), ("ddim", "dpm-solver"), ("ddim", "ddim-eta1")):
        assert not np.array_equal(out[a], out[b]), (a, b)
    info = json.loads((tmp_path / "unipc" / "sample_info.json").read_text())
    assert info["scheduler"] == "unipc" and info["num_steps"] == 4
    assert info["num_evaluations"] == 4


def test_two_processes_give_the_one_process_images_and_fid(ddpm_run: Path, tmp_path: Path) -> None:
    """10 samples in chunks of 4 (rank 0: chunks 0 and 2, rank 1: chunk 1), stochastic DDPM
    steps: each sample's noise comes from its own seed, so the split changes nothing."""
    flags = [
        "--scheduler=ddpm",
        "--num-steps=5",
        "--num-samples=10",
        "--batch-size=4",
        "--seed=3",
        "--fid",
        "--dataset=digits",
        f"--max-reference={NUM_IMAGES}",
    ]
    one = run_sample(ddpm_run / "pipeline", tmp_path / "one", *flags)
    log = launch_two_processes(
        ["sample.py", str(ddpm_run / "pipeline"), f"--output-dir={tmp_path / 'two'}", *flags],
        tmp_path,
    )
    info = json.loads((tmp_path / "two" / "sample_info.json").read_text())
    assert info["num_processes"] == 2
    with np.load(tmp_path / "two" / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], one)

    metrics = {n: json.loads((tmp_path / n / "fid.json").read_text()) for n in ("one", "two")}
    assert metrics["one"]["num_samples"] == 10 and metrics["one"]["num_reference"] == NUM_IMAGES
    assert metrics["one"]["fid"] > 0
    for key in ("fid", "kid_mean"):
        assert metrics["two"][key] == pytest.approx(metrics["one"][key], rel=1e-6), key
    assert f"FID {metrics['two']['fid']:.4f}" in log  # printed as well


def test_edm_export_checkpoint_and_run_dir_give_the_same_images(
    edm_run: Path, tmp_path: Path
) -> None:
    common = ("--num-samples=4", "--num-steps=3")
    pipeline = run_sample(edm_run / "pipeline", tmp_path / "pipeline", *common)
    assert pipeline.shape == (4, RESOLUTION, RESOLUTION, 1) and pipeline.std() > 0
    for name, path in (("checkpoint", edm_run / "checkpoints" / "checkpoint-6"), ("run", edm_run)):
        assert np.array_equal(run_sample(path, tmp_path / name, *common), pipeline), name
    info = json.loads((tmp_path / "checkpoint" / "sample_info.json").read_text())
    assert info["task"] == "edm" and info["scheduler"] == "edm-heun" and info["churn"] == 0
    assert info["num_evaluations"] == 5  # Heun: 2 per step but the last
    euler = run_sample(edm_run / "pipeline", tmp_path / "euler", *common, "--scheduler=edm-euler")
    raw = run_sample(edm_run / "pipeline", tmp_path / "raw", *common, "--weights=raw")
    assert not np.array_equal(euler, pipeline) and not np.array_equal(raw, pipeline)


def test_two_processes_give_the_one_process_edm_images(edm_run: Path, tmp_path: Path) -> None:
    """Stochastic EDM sampling (churn): every image's noise comes from its own seed."""
    flags = ["--num-steps=3", "--churn=5", "--num-samples=6", "--batch-size=2", "--seed=4"]
    one = run_sample(edm_run / "pipeline", tmp_path / "one", *flags)
    launch_two_processes(
        ["sample.py", str(edm_run / "pipeline"), f"--output-dir={tmp_path / 'two'}", *flags],
        tmp_path,
    )
    assert json.loads((tmp_path / "two" / "sample_info.json").read_text())["num_processes"] == 2
    with np.load(tmp_path / "two" / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], one)


def test_samplers_of_another_kind_and_their_knobs_are_refused(
    ddpm_run: Path, edm_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(BAD_INPUT, match="--scheduler ddim does not sample edm models"):
        run_sample(edm_run / "pipeline", tmp_path / "a", "--scheduler=ddim")
    with pytest.raises(BAD_INPUT, match="--scheduler edm-heun does not sample ddpm models"):
        run_sample(ddpm_run / "pipeline", tmp_path / "b", "--scheduler=edm-heun")
    with pytest.raises(BAD_INPUT, match="--churn applies to no sampler of this kind"):
        run_sample(ddpm_run / "pipeline", tmp_path / "c", "--churn=1")
    with pytest.raises(BAD_INPUT, match="--eta applies to --scheduler euler-ancestral; the"):
        run_sample(edm_run / "pipeline", tmp_path / "d", "--eta=1")
    with pytest.raises(BAD_INPUT, match="--eta applies to --scheduler ddim; the sampler is unipc"):
        run_sample(ddpm_run / "pipeline", tmp_path / "e", "--scheduler=unipc", "--eta=1")
    with pytest.raises(ValueError, match="--churn must be >= 0"):
        sample.SampleConfig(model_path=str(edm_run), churn=-1.0)
    with pytest.raises(ValueError, match="--compile-mode and --compile-backend apply with"):
        sample.SampleConfig(model_path=str(edm_run), compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match=r"--eta must be in \[0, 1\]"):
        sample.SampleConfig(model_path=str(ddpm_run), eta=5.0)
    with pytest.raises(BAD_INPUT, match="--num-steps 5000 is more than ddim can take: the model "
                       "was trained with 1000 timesteps"):  # fmt: skip
        run_sample(ddpm_run / "pipeline", tmp_path / "f", "--num-steps=5000")


def test_bad_flags_are_named(ddpm_run: Path) -> None:
    path = str(ddpm_run / "pipeline")
    with pytest.raises(ValueError, match="--fid needs --dataset"):
        sample.SampleConfig(model_path=path, fid=True)
    with pytest.raises(ValueError, match="--max-reference must be >= 2"):
        sample.SampleConfig(model_path=path, fid=True, dataset="digits", max_reference=1)
    with pytest.raises(ValueError, match="does not exist"):
        sample.SampleConfig(model_path=str(ddpm_run / "nope"))


def test_long_sampling_shows_progress(basic_run: Path, tmp_path: Path, capsys) -> None:
    run_sample(basic_run / "model", tmp_path / "p", "--num-samples=6", "--batch-size=2")
    err = capsys.readouterr().err
    assert "sampling" in err and "6/6" in err and "img/s" in err


def test_a_refused_sample_writes_nothing_and_the_config_comes_with_the_samples(
    ddpm_run: Path, tmp_path: Path
) -> None:
    pipeline = ddpm_run / "pipeline"
    fresh = tmp_path / "new" / "deeper"
    with pytest.raises(ValueError, match="is not class-conditional"):
        run_sample(pipeline, fresh, "--class-labels=3")
    assert not (tmp_path / "new").exists()  # no folder made for a refused run
    # An earlier result: a refused run (a check after loading the model, or a bad --fid
    # reference, found before sampling) leaves it as it was.
    done = tmp_path / "done"
    run_sample(pipeline, done, "--num-samples=2", "--num-steps=2")
    assert "num_samples: 2" in (done / "sample_config.yaml").read_text()
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    with pytest.raises(ValueError, match="--scheduler edm-heun does not sample ddpm models"):
        run_sample(pipeline, done, "--num-samples=5", "--scheduler=edm-heun")
    with pytest.raises(ValueError, match="no-such-folder"):
        run_sample(pipeline, done, "--num-samples=5", "--fid", "--dataset=./no-such-folder")
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before


def test_sample_says_which_checkpoint_of_a_run_and_that_it_is_still_training(
    ddpm_run: Path, tmp_path: Path, capsys
) -> None:
    from ddp_utils.lock import RunLock

    run = tmp_path / "run"
    shutil.copytree(ddpm_run, run, ignore=shutil.ignore_patterns("pipeline"))
    run_sample(run, tmp_path / "a", "--num-samples=2", "--num-steps=2")
    log = capsys.readouterr().out
    assert "(a checkpoint: checkpoint-6)" in log
    assert f"{run} has no export (its training has not finished" in log
    lock = RunLock.acquire(run)  # as a run training there holds it
    try:
        run_sample(run, tmp_path / "b", "--num-samples=2", "--num-steps=2")
    finally:
        lock.release()
    assert f"{run} is still being trained (pid " in capsys.readouterr().out
    # --fid against a dataset of another size: said (digits are 16x16, this model makes 8x8).
    run_sample(run, tmp_path / "c", "--num-samples=4", "--num-steps=2", "--fid",
               "--dataset=digits", f"--max-reference={NUM_IMAGES}")  # fmt: skip
    assert "--dataset digits has 16x16 images and the samples are 8x8" in capsys.readouterr().out


@pytest.mark.parametrize("value_range", [[0, 255], [1, -1]])
def test_an_export_whose_value_range_is_not_ours_is_refused(
    basic_run: Path, tmp_path: Path, value_range: list[int]
) -> None:
    """[0, 255] would give near-black samples; [1, -1] failed only once sampling had started.
    The task.json is edited as a tool that means it would: its checksum made to match."""
    from ddp_utils.export import write_checksums
    from diffusion.loading import load_for_sampling

    export = tmp_path / "model"
    shutil.copytree(basic_run / "model", export)
    task = json.loads((export / "task.json").read_text())
    (export / "task.json").write_text(json.dumps({**task, "value_range": value_range}))
    write_checksums(export)
    with pytest.raises(
        ValueError, match=rf"task.json is damaged: its value_range is \[{value_range[0]}"
    ):
        load_for_sampling(export)
    with pytest.raises(BAD_INPUT, match="expected \\[0, 1\\] or \\[-1, 1\\]"):
        run_sample(export, tmp_path / "out")
    assert not (tmp_path / "out").exists()
