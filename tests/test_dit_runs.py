"""A diffusion transformer through the whole toolkit, as a user meets it: `--backbone dit`
trains class-conditional DDPM and EDM models, every sampler samples them, a resume is bit-exact,
two processes train and sample as one does, and the export runs in diffusers alone and draws
sample.py's images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sample
import train_ddpm
from ddp_utils.config import parse_config
from ddp_utils.errors import InputError
from diffusion.conditioning.classes import ClassLabels
from diffusion.kinds import KINDS, SamplerChoice
from diffusion.loading import load_for_sampling
from diffusion.networks import sample_shape
from diffusion.sampling import sample_seed
from tests.tiny_runs import fresh_accelerate_state, launch_two_processes

REPO = Path(__file__).resolve().parents[1]
TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}


def dit_args(out: Path, preset: Path, *extra: str) -> list[str]:
    return [
        "--backbone", "dit", "--preset", str(preset), "--class-conditional",
        "--resolution", "8", "--max-images", "32", "--max-steps", "6",
        "--batch-size", "4", "--gradient-accumulation-steps", "2", "--lr-warmup-steps", "2",
        "--checkpoint-every", "3", "--checkpoints-total-limit", "none", "--log-every", "1",
        "--sample-every", "6", "--num-sample-images", "10", "--sample-steps", "3",
        "--report-to", "none", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def train(args: list[str]) -> None:
    """In-process, on one thread whatever the fixture order (module fixtures are set up before
    conftest's one-thread fixture, and a convolution's gradient rounds by thread count)."""
    fresh_accelerate_state()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_ddpm.main(args)
    finally:
        torch.set_num_threads(previous)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {**load_file(checkpoint / "model.safetensors"), **{
        f"ema.{k}": v for k, v in load_file(checkpoint / "ema.safetensors").items()}}  # fmt: skip


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert sorted(first) == sorted(second)
    differ = [key for key, value in first.items() if not torch.equal(value, second[key])]
    assert not differ, f"{len(differ)} of {len(first)} tensors differ: {differ[:8]}"


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dit_preset") / "tiny_dit.json"
    path.write_text(json.dumps(TINY_DIT))
    return path


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory, preset: Path) -> Path:
    out = tmp_path_factory.mktemp("dit") / "run"
    train(dit_args(out, preset))
    return out


@pytest.fixture(scope="module")
def edm_dit_run(tmp_path_factory, preset: Path) -> Path:
    out = tmp_path_factory.mktemp("edm_dit") / "run"
    train(dit_args(out, preset, "--objective", "edm"))
    return out


def test_a_dit_run_exports_a_transformer_pipeline_with_its_card(dit_run: Path) -> None:
    pipeline = dit_run / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert index["unet"] == [None, None]
    assert index["_class_name"] == ["pipeline", "GuidedDDPMPipeline"]
    for name in ("transformer", "transformer_raw"):
        assert (pipeline / name / "diffusion_pytorch_model.safetensors").is_file()
    info = json.loads((pipeline / "task.json").read_text())
    assert info["task"] == "ddpm" and info["backbone"] == "dit"
    card = (pipeline / "README.md").read_text()
    assert "DiTTransformer2DModel" in card and "- dit" in card and "- class-conditional" in card
    loaded = load_for_sampling(pipeline)
    assert loaded.num_classes == 10 and sample_shape(loaded.model) == (1, 8, 8)
    # diffusers' own label dropout stays off after loading: train mode is deterministic too.
    net = loaded.model.train()
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 500.0]), torch.tensor([1, 10])
    assert torch.equal(net(x, t, labels).sample, net(x, t, labels).sample)


@pytest.mark.parametrize("objective", ["ddpm", "edm"])
def test_every_sampler_of_the_objective_samples_the_dit(objective, dit_run, edm_dit_run) -> None:
    loaded = load_for_sampling((dit_run if objective == "ddpm" else edm_dit_run) / "pipeline")
    kind = KINDS[objective]
    classes = ClassLabels(tuple(loaded.class_names))
    for name in kind.samplers:
        draw = kind.sampler(
            loaded.model.eval(), loaded.scheduler_config, SamplerChoice(name, 2),
            seed=0, shape=sample_shape(loaded.model), device="cpu", guidance_scale=2.0,
            null=classes.null,
        )  # fmt: skip
        images, _ = draw(range(2), {"class_labels": torch.tensor([3, 7])}, None)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all(), name


def test_the_dit_export_runs_in_diffusers_alone_and_reproduces_sample_py(dit_run, tmp_path):
    fresh_accelerate_state()
    flags = ["--num-samples=3", "--num-steps=4", "--scheduler=ddim", "--eta=0"]
    sample.sample(parse_config(sample.SampleConfig, [str(dit_run / "pipeline"),
                                                     f"--output-dir={tmp_path}", *flags]))  # fmt: skip
    with np.load(tmp_path / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["labels"]
    script = f"""
import sys, numpy as np, torch
sys.path = [p for p in sys.path if p not in ("", "{REPO}")]
from diffusers import DiffusionPipeline, DDIMScheduler
pipe = DiffusionPipeline.from_pretrained("{dit_run / "pipeline"}", trust_remote_code=True,
                                         use_safetensors=True)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
seeds = {[sample_seed(0, k) for k in range(3)]}
out = pipe(class_labels={labels.tolist()}, num_inference_steps=4,
           generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")
np.save("{tmp_path / "theirs.npy"}", out.images)
print(type(pipe.transformer).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DiTTransformer2DModel" in done.stdout
    theirs = np.round(np.load(tmp_path / "theirs.npy") * 255)
    assert np.abs(theirs - images.astype(np.float64)).max() <= 1  # same images, up to rounding


def test_an_edm_dit_exports_an_edm_pipeline(edm_dit_run: Path) -> None:
    index = json.loads((edm_dit_run / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "EDMPipeline"]
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert json.loads((edm_dit_run / "pipeline" / "task.json").read_text())["task"] == "edm"


def test_a_resumed_dit_run_ends_bit_identical(dit_run: Path, preset: Path, tmp_path) -> None:
    out = tmp_path / "resumed"
    train(dit_args(out, preset, "--max-steps", "3"))
    train(dit_args(out, preset))  # the same command, longer: resumes from checkpoint-3
    assert_same_weights(
        dit_run / "checkpoints" / "checkpoint-6", out / "checkpoints" / "checkpoint-6"
    )


def test_two_processes_train_and_sample_the_dit_as_one_does(dit_run, preset, tmp_path) -> None:
    """Global batch 8 either way (1 process x accumulation 2 x 4, or 2 processes x 4): the same
    learning rate at every step; and sample.py on two processes draws the one-process images."""
    args = dit_args(tmp_path / "two", preset)
    args[args.index("--gradient-accumulation-steps") + 1] = "1"
    log = launch_two_processes(["train_ddpm.py", *args], tmp_path)
    assert "per device 4 x 2 processes x 1 accumulation = global 8" in log
    lrs = {}
    for name, run in (("one", dit_run), ("two", tmp_path / "two")):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        lrs[name] = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs["one"]) == 6 and lrs["one"] == lrs["two"]
    assert (tmp_path / "two" / "pipeline" / "transformer").is_dir()

    flags = ["--num-samples=6", "--batch-size=2", "--num-steps=3"]
    fresh_accelerate_state()
    sample.sample(parse_config(sample.SampleConfig, [str(dit_run / "pipeline"),
                                                     f"--output-dir={tmp_path / 'one'}", *flags]))  # fmt: skip
    launch_two_processes(["sample.py", str(dit_run / "pipeline"),
                          f"--output-dir={tmp_path / 'two-samples'}", *flags], tmp_path)  # fmt: skip
    with np.load(tmp_path / "one" / "samples.npz") as one, \
            np.load(tmp_path / "two-samples" / "samples.npz") as two:  # fmt: skip
        assert np.array_equal(one["arr_0"], two["arr_0"])
        assert np.array_equal(one["labels"], two["labels"])


def test_backbone_and_preset_must_agree(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        train_ddpm.main(["--backbone", "unet", "--preset", "dit-digits", "--dry-run"])
    assert stopped.value.code == 2
    assert "'dit-digits' is a dit preset, but --backbone is unet" in capsys.readouterr().err


def test_fine_tuning_starts_from_a_dit_export(dit_run: Path, tmp_path: Path) -> None:
    """--init-from a DiT export: the network is its (no --preset), the weights its EMA ones."""
    out = tmp_path / "tuned"
    args = [
        "--init-from", str(dit_run / "pipeline"), "--class-conditional", "--resolution", "8",
        "--max-images", "32", "--max-steps", "1", "--batch-size", "4", "--sample-every", "0",
        "--num-sample-images", "2", "--sample-steps", "2", "--report-to", "none",
        "--learning-rate", "1e-9", "--lr-warmup-steps", "0", "--output-dir", str(out),
    ]  # fmt: skip
    train(args)
    start = load_for_sampling(dit_run / "pipeline").model
    tuned = load_for_sampling(out / "pipeline", "raw").model
    assert type(tuned).__name__ == "DiTTransformer2DModel"
    for (name, a), b in zip(start.state_dict().items(), tuned.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # one step of LR 1e-9
    with pytest.raises(InputError, match="is a dit network: drop --backbone unet"):
        train([*args[:-1], str(tmp_path / "other"), "--backbone", "unet"])
