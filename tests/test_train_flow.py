"""train_ddpm.py --objective flow end to end: a class-conditional DiT and a latent UNet, their
files and export (run by diffusers alone, giving sample.py's images), exact resume, two
processes, fine-tuning, and the flow flags.

The math (Gaussian data's exact answers, diffusers' scheduler step for step) is in test_flow.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import fresh_accelerate_state, launch_two_processes, read_jsonl, tiny_preset

import sample
import train_ddpm
from ddp_utils.config import parse_config
from ddp_utils.errors import InputError
from diffusion.kinds.flow import pipeline as flow_pipeline
from diffusion.loading import load_for_sampling
from diffusion.pipeline_code import shipped_source
from diffusion.sampling import sample_seed
from tests.test_latent import make_vae

REPO = Path(__file__).resolve().parents[1]
TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}


def flow_args(out: Path, preset: Path, *extra: str) -> list[str]:
    return [
        "--objective", "flow", "--backbone", "dit", "--preset", str(preset),
        "--class-conditional", "--resolution", "8", "--max-images", "32", "--max-steps", "6",
        "--batch-size", "4", "--gradient-accumulation-steps", "2", "--lr-warmup-steps", "2",
        "--checkpoint-every", "3", "--checkpoints-total-limit", "none", "--log-every", "1",
        "--sample-every", "6", "--num-sample-images", "10", "--sample-steps", "3",
        "--report-to", "none", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def train(args: list[str]) -> None:
    """In-process, on one thread whatever the fixture order."""
    fresh_accelerate_state()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ddpm.main(args)
    finally:
        torch.set_num_threads(previous)


def sample_images(folder: Path, out: Path, *flags: str) -> tuple[np.ndarray, np.ndarray | None]:
    fresh_accelerate_state()
    sample.sample(parse_config(sample.SampleConfig, [str(folder), f"--output-dir={out}", *flags]))
    with np.load(out / "samples.npz") as npz:
        return npz["arr_0"], npz["labels"] if "labels" in npz.files else None


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("flow_preset") / "tiny_dit.json"
    path.write_text(json.dumps(TINY_DIT))
    return path


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, preset: Path) -> Path:
    out = tmp_path_factory.mktemp("flow") / "run"
    train(flow_args(out, preset))
    return out


def test_a_flow_run_writes_losses_by_time_pictures_and_a_flow_pipeline(flow_run: Path) -> None:
    state = json.loads((flow_run / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    assert state["task"] == "flow" and state["config"]["sample_scheduler"] == "euler"
    assert state["scheduler_config"]["shift"] == 1.0
    losses = [r for r in read_jsonl(flow_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 7))
    bins = [f"loss_t_q{q}" for q in range(4)]
    assert all(any(b in r for b in bins) for r in losses)
    assert all(np.isfinite(r[b]) and r[b] > 0 for r in losses for b in bins if b in r)
    pictures = {p.name for p in (flow_run / "samples").iterdir()}
    assert {"forward_noising-0000000.png", "samples-0000006.png", "denoising-0000006.png"} <= (
        pictures
    )
    pipeline = flow_run / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "FlowPipeline"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert (pipeline / "pipeline.py").read_text() == shipped_source(flow_pipeline)
    info = json.loads((pipeline / "task.json").read_text())
    assert info["task"] == "flow" and info["class_names"] == [str(d) for d in range(10)]
    assert info["time_sampling"] == {
        "distribution": "logit-normal", "shift": 1.0, "logit_mean": 0.0, "logit_std": 1.0,
    }  # fmt: skip
    card = (pipeline / "README.md").read_text()
    assert "rectified flow" in card and "- rectified-flow" in card and "sampler='euler'" in card
    loaded = load_for_sampling(pipeline)
    assert loaded.task == "flow" and loaded.num_classes == 10


def test_the_export_runs_in_diffusers_alone_and_gives_sample_pys_images(
    flow_run: Path, tmp_path: Path
) -> None:
    """Euler (the default) and Heun, guided at w = 3 for the classes asked: the folder's
    pipeline.py with every module of this toolkit blocked draws sample.py's images."""
    ours = {
        sampler: sample_images(
            flow_run / "pipeline",
            tmp_path / sampler,
            "--num-samples=4",
            "--num-steps=4",
            f"--scheduler={sampler}",
            "--class-labels=3,7",
            "--guidance-scale=3",
            "--seed=5",
        )  # fmt: skip
        for sampler in ("euler", "heun")
    }
    labels = ours["euler"][1].tolist()
    assert labels == [3, 7, 3, 7]
    script = f"""
import sys, numpy as np, torch
from importlib.abc import MetaPathFinder
class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"ddp_utils", "diffusion", "evaluation", "sample"}}:
            raise ImportError(name)
sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if p not in ("", "{REPO}")]
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{flow_run / "pipeline"}", trust_remote_code=True,
                                         use_safetensors=True)
assert type(pipe).__name__ == "FlowPipeline", type(pipe)
seeds = {[sample_seed(5, k) for k in range(4)]}
for sampler in ("euler", "heun"):
    out = pipe(class_labels={labels}, num_inference_steps=4, sampler=sampler, guidance_scale=3.0,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")
    np.save("{tmp_path}/" + sampler + ".npy", out.images)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # The saved guidance interval (a list in JSON) matches the pipeline's signature: no warning.
    assert "Expected types" not in done.stderr, done.stderr[-3000:]
    for sampler, (images, _) in ours.items():
        theirs = np.round(np.load(tmp_path / f"{sampler}.npy") * 255)
        assert theirs.shape == images.shape == (4, 8, 8, 1)
        assert np.abs(theirs - images.astype(np.float64)).max() <= 1, sampler
        assert images.std() > 0
    assert not np.array_equal(ours["euler"][0], ours["heun"][0])


def test_every_flow_sampler_and_knob_samples_the_export(flow_run: Path, tmp_path: Path) -> None:
    runs = {
        "dpm++2m": ["--scheduler=dpm++2m"],
        "ancestral": ["--scheduler=euler-ancestral", "--eta=0.5"],
        "churn": ["--scheduler=heun", "--churn=2"],
        "shift": ["--shift=3"],
    }
    images = {}
    for name, flags in runs.items():
        images[name], _ = sample_images(flow_run / "pipeline", tmp_path / name,
                                        "--num-samples=2", "--num-steps=3", *flags)  # fmt: skip
        assert images[name].shape == (2, 8, 8, 1), name
    info = json.loads((tmp_path / "shift" / "sample_info.json").read_text())
    assert info["scheduler"] == "euler" and info["shift"] == 3.0
    with pytest.raises(InputError, match="--eta applies to --scheduler"):
        sample_images(flow_run / "pipeline", tmp_path / "bad", "--eta=0.5")
    with pytest.raises(InputError, match="--scheduler ddim does not sample flow models"):
        sample_images(flow_run / "pipeline", tmp_path / "bad", "--scheduler=ddim")


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {**load_file(checkpoint / "model.safetensors"), **{
        f"ema.{k}": v for k, v in load_file(checkpoint / "ema.safetensors").items()}}  # fmt: skip


def test_a_resumed_flow_run_ends_bit_identical(flow_run: Path, preset: Path, tmp_path) -> None:
    out = tmp_path / "resumed"
    train(flow_args(out, preset, "--max-steps", "3"))
    train(flow_args(out, preset))  # the same command, longer: resumes from checkpoint-3
    first = weights(flow_run / "checkpoints" / "checkpoint-6")
    second = weights(out / "checkpoints" / "checkpoint-6")
    assert sorted(first) == sorted(second)
    assert all(torch.equal(value, second[key]) for key, value in first.items())


@pytest.mark.slow
def test_two_processes_train_and_sample_flow_as_one_does(flow_run, preset, tmp_path) -> None:
    args = flow_args(tmp_path / "two", preset)
    args[args.index("--gradient-accumulation-steps") + 1] = "1"
    log = launch_two_processes(["train_ddpm.py", *args], tmp_path)
    assert "per device 4 x 2 processes x 1 accumulation = global 8" in log
    two = json.loads((tmp_path / "two" / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    assert two["task"] == "flow" and two["num_processes"] == 2
    flags = ["--num-samples=6", "--batch-size=2", "--num-steps=3", "--scheduler=euler-ancestral"]
    one, _ = sample_images(flow_run / "pipeline", tmp_path / "one", *flags)
    launch_two_processes(["sample.py", str(flow_run / "pipeline"),
                          f"--output-dir={tmp_path / 'two-samples'}", *flags], tmp_path)  # fmt: skip
    with np.load(tmp_path / "two-samples" / "samples.npz") as npz:
        assert np.array_equal(one, npz["arr_0"])


def test_flow_on_latents_with_a_unet(tmp_path: Path) -> None:
    """Rectified flow behind a VAE, unconditional, a UNet: the export ships the VAE, samples
    decode to images, the time shift follows SD3's resolution rule (4x4x4 latents: 64 values)."""
    vae = make_vae(tmp_path / "vae")
    out = tmp_path / "run"
    train([
        "--objective", "flow", "--preset", str(tiny_preset(tmp_path)), "--vae", str(vae),
        "--resolution", "16", "--max-images", "16", "--max-steps", "2", "--batch-size", "4",
        "--sample-every", "0", "--num-sample-images", "4", "--sample-steps", "2",
        "--time-shift", "resolution", "--time-sampling", "mode", "--report-to", "none",
        "--output-dir", str(out),
    ])  # fmt: skip
    info = json.loads((out / "pipeline" / "task.json").read_text())
    assert info["task"] == "flow" and "latent" in info
    assert info["time_sampling"]["shift"] == pytest.approx(0.0625)  # sqrt(64 / 16384)
    assert (out / "pipeline" / "vae" / "config.json").is_file()
    images, _ = sample_images(out / "pipeline", tmp_path / "samples", "--num-samples=2",
                              "--num-steps=2")  # fmt: skip
    assert images.shape == (2, 16, 16, 1)


def test_fine_tuning_a_flow_export_and_refusing_another_kinds(flow_run, tmp_path) -> None:
    common = [
        "--class-conditional", "--resolution", "8", "--max-images", "32", "--max-steps", "1",
        "--batch-size", "4", "--sample-every", "0", "--num-sample-images", "2",
        "--sample-steps", "2", "--report-to", "none", "--learning-rate", "1e-9",
        "--lr-warmup-steps", "0",
    ]  # fmt: skip
    out = tmp_path / "tuned"
    train(["--objective", "flow", "--init-from", str(flow_run / "pipeline"),
           "--output-dir", str(out), *common])  # fmt: skip
    assert load_for_sampling(out / "pipeline").task == "flow"
    with pytest.raises(InputError, match="trained with --objective flow, this run uses"):
        train(["--init-from", str(flow_run / "pipeline"), "--output-dir",
               str(tmp_path / "ddpm"), *common])  # fmt: skip


def test_dry_run_resolves_the_flow_sampler(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main(["--objective=flow", "--dry-run"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for line in ("objective: flow", "sample_scheduler: euler", "sample_steps: 50",
                 "time_sampling: logit-normal", "time_shift: '1'"):  # fmt: skip
        assert line in printed, line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--objective=flow", "--time-shift=0"], "--time-shift takes a number > 0"),
        (["--objective=flow", "--time-shift=big"], "--time-shift takes a number > 0"),
        (["--objective=flow", "--logit-std=0"], "--logit-std must be > 0"),
        (["--objective=flow", "--mode-scale=3"], "--mode-scale must be in"),
        (["--objective=flow", "--p-mean=0"], "--p-mean applies to --objective edm only"),
        (["--objective=flow", "--prediction-type=epsilon"], "--prediction-type applies to"),
        (["--time-shift=3"], "--time-shift applies to --objective flow only"),
        (["--sample-shift=3"], "--sample-shift applies to no sampler of this kind"),
        (["--objective=flow", "--sample-scheduler=ddim"], "--sample-scheduler ddim does not"),
        (["--objective=flow", "--sample-eta=0.5"], "--sample-eta applies to --sample-scheduler"),
    ],
)
def test_bad_flow_flags_are_named(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_ddpm.main([*flags, "--dry-run"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
