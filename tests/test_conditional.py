"""Class-conditional training and classifier-free guidance, as a user meets them: samples of
the asked class, guidance that matters, exports diffusers runs, the same images on 1 or 2
processes, per-class scores, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import sample
import train_ddpm
from ddp_utils.config import parse_config
from diffusion.conditioning.classes import ClassLabels
from diffusion.sampling import sample_seed
from tests.tiny_runs import fresh_accelerate_state, launch_two_processes, tiny_preset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory) -> Path:
    """The digits at their native 8x8 with their class labels: 250 steps of digits-small
    (~10 s on one CPU thread) already draw the asked digit nearly always at w = 3."""
    out = tmp_path_factory.mktemp("conditional") / "run"
    fresh_accelerate_state()
    train_ddpm.main(
        [
            "--class-conditional", "--sample-guidance-scale", "3", "--resolution", "8",
            "--max-steps", "250",
            "--batch-size", "32", "--learning-rate", "1e-3", "--lr-warmup-steps", "20",
            "--log-every", "50", "--checkpoint-every", "125", "--sample-every", "250",
            "--num-sample-images", "20", "--sample-steps", "4", "--report-to", "none",
            "--output-dir", str(out),
        ]
    )  # fmt: skip
    return out


def run_sample(model: Path, out: Path, *flags: str) -> tuple[np.ndarray, np.ndarray]:
    fresh_accelerate_state()
    sample.sample(parse_config(sample.SampleConfig, [str(model), f"--output-dir={out}", *flags]))
    with np.load(out / "samples.npz") as npz:
        return npz["arr_0"], npz["labels"]


def test_samples_show_the_asked_digit_and_guidance_matters(conditional_run, tmp_path) -> None:
    """A classifier trained here on the real digits (97% on them) reads the samples' classes:
    far above chance (10%) when guided, at chance with w = 0 (the unconditional model)."""
    digits = load_digits()
    classifier = LogisticRegression(max_iter=3000).fit(digits.data, digits.target)

    def accuracy(images: np.ndarray, labels: np.ndarray) -> float:
        pixels = images[..., 0].reshape(len(images), -1) / 255 * 16  # back to 0..16
        return float((classifier.predict(pixels) == labels).mean())

    common = ("--num-samples=100", "--batch-size=100", "--num-steps=10")
    guided, labels = run_sample(conditional_run / "pipeline", tmp_path / "w3", *common)
    unguided, _ = run_sample(conditional_run / "pipeline", tmp_path / "w0", *common,
                             "--guidance-scale=0")  # fmt: skip
    assert labels.tolist() == [k % 10 for k in range(100)]  # class-balanced: k mod 10
    assert accuracy(guided, labels) >= 0.7, accuracy(guided, labels)
    assert accuracy(unguided, labels) <= 0.35
    assert not np.array_equal(guided, unguided)
    info = json.loads((tmp_path / "w3" / "sample_info.json").read_text())
    assert info["guidance_scale"] == 3.0 and info["class_names"] == [str(d) for d in range(10)]
    # Two chosen classes by name, alternating.
    _, chosen = run_sample(conditional_run / "pipeline", tmp_path / "pick", "--num-samples=4",
                           "--num-steps=2", "--class-labels=3,7")  # fmt: skip
    assert chosen.tolist() == [3, 7, 3, 7]


def test_grids_put_one_class_per_row(conditional_run, tmp_path) -> None:
    # Training grids: 20 images, sample k of class k mod 10: 10 rows of 2 images of 8 pixels
    # and 2 of padding, upscaled by 6 (102 * 6 >= 512).
    with Image.open(conditional_run / "samples" / "samples-0000250.png") as grid:
        assert grid.size == (6 * (2 * 10 + 2), 6 * (10 * 10 + 2))
    run_sample(conditional_run / "pipeline", tmp_path / "g", "--num-samples=30", "--num-steps=2")
    with Image.open(tmp_path / "g" / "grid.png") as grid:
        width, height = grid.size
    assert height / width == pytest.approx((10 * 10 + 2) / (3 * 10 + 2), rel=1e-6)
    # The trackers' caption names each row's class, top to bottom: the classes with a sample.
    assert ClassLabels(tuple("0123456789")).grid_rows(20) == list("0123456789")
    assert ClassLabels(tuple("0123456789"), cycle=(7, 2)).grid_rows(3) == ["2", "7"]


def test_the_export_runs_in_diffusers_and_reproduces_sample_py(conditional_run, tmp_path):
    """`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` in a fresh process,
    with nothing of ours importable: the classes by name, the guidance it was exported with,
    and sample.py's images from sample.py's seeds."""
    images, labels = run_sample(conditional_run / "pipeline", tmp_path / "ours", "--num-samples=3",
                                "--num-steps=5", "--scheduler=ddim", "--eta=0")  # fmt: skip
    script = f"""
import sys, numpy as np, torch
sys.path = [p for p in sys.path if p not in ("", "{REPO}")]
from diffusers import DiffusionPipeline, DDIMScheduler
pipe = DiffusionPipeline.from_pretrained("{conditional_run / "pipeline"}", trust_remote_code=True,
                                         use_safetensors=True)
assert type(pipe).__name__ == "GuidedDDPMPipeline", type(pipe)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
seeds = {[sample_seed(0, k) for k in range(3)]}
out = pipe(class_labels={[str(c) for c in labels.tolist()]}, num_inference_steps=5,
           generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")
np.save("{tmp_path / "theirs.npy"}", out.images)
print(pipe.config.class_names, pipe.config.guidance_scale)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['0', '1', '2', '3'" in done.stdout and "3.0" in done.stdout
    theirs = np.round(np.load(tmp_path / "theirs.npy") * 255)
    assert np.abs(theirs - images.astype(np.float64)).max() <= 1  # same images, up to rounding


def test_two_processes_sample_the_one_process_images(conditional_run, tmp_path) -> None:
    flags = ["--num-samples=10", "--batch-size=4", "--num-steps=3", "--class-labels=all"]
    one, labels = run_sample(conditional_run / "pipeline", tmp_path / "one", *flags)
    launch_two_processes(
        ["sample.py", str(conditional_run / "pipeline"), f"--output-dir={tmp_path / 'two'}",
         *flags], tmp_path,
    )  # fmt: skip
    with np.load(tmp_path / "two" / "samples.npz") as npz:
        assert np.array_equal(npz["arr_0"], one) and np.array_equal(npz["labels"], labels)


def test_per_class_scores_match_between_sample_py_and_evaluate_py(conditional_run, tmp_path):
    import evaluate

    flags = ("--num-samples=20", "--num-steps=3", "--fid", "--dataset=digits",
             "--max-reference=30", "--per-class-fid")  # fmt: skip
    run_sample(conditional_run / "pipeline", tmp_path / "s", *flags)
    mine = json.loads((tmp_path / "s" / "fid.json").read_text())
    assert sorted(mine["per_class"], key=int) == [str(d) for d in range(10)]
    fresh_accelerate_state()
    evaluate.main(["--samples", str(tmp_path / "s" / "samples.npz"), "--dataset=digits",
                   "--resolution=8", "--max-reference=30", "--per-class",
                   "--output", str(tmp_path / "e.json")])  # fmt: skip
    theirs = json.loads((tmp_path / "e.json").read_text())
    assert theirs["fid"] == pytest.approx(mine["fid"], rel=1e-6)
    for name, scores in mine["per_class"].items():
        assert theirs["per_class"][name]["fid"] == pytest.approx(scores["fid"], rel=1e-6)


def test_conditional_edm_exports_with_classes(tmp_path) -> None:
    from diffusers import DiffusionPipeline

    out = tmp_path / "edm"
    fresh_accelerate_state()
    train_ddpm.main(
        ["--objective", "edm", "--class-conditional", f"--preset={tiny_preset(tmp_path)}",
         "--resolution=8", "--max-images=40", "--max-steps=2", "--batch-size=8",
         "--sample-every=0", "--num-sample-images=4", "--sample-steps=2", "--report-to=none",
         "--output-dir", str(out)]
    )  # fmt: skip
    images, labels = run_sample(out / "pipeline", tmp_path / "s", "--num-samples=2",
                                "--num-steps=2", "--class-labels=5")  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(
        out / "pipeline", trust_remote_code=True, use_safetensors=True
    )
    assert type(pipe).__name__ == "EDMPipeline" and pipe.config.class_names[5] == "5"
    theirs = pipe(class_labels=["5", "5"], num_inference_steps=2, output_type="np",
                  generator=[torch.Generator().manual_seed(sample_seed(0, k)) for k in range(2)],
                  ).images  # fmt: skip
    assert labels.tolist() == [5, 5]
    assert np.abs(np.round(theirs * 255) - images).max() <= 1
    # Its card names no unconditional task: the hub has no class-conditional pipeline tag.
    card = ModelCard.load(out / "pipeline" / "README.md")
    assert card.data.pipeline_tag is None and "unconditional" not in card.content
    assert "class-conditional-image-generation" in card.data.tags


def test_class_options_are_refused_where_they_make_no_sense(
    tmp_path_factory, tmp_path, capsys
) -> None:
    from ddp_utils.errors import InputError
    from tests.tiny_runs import trained_ddpm

    with pytest.raises(InputError, match="--class-labels: .* is not class-conditional"):
        run_sample(trained_ddpm(tmp_path_factory) / "pipeline", tmp_path / "u", "--class-labels=3")
    folder = tmp_path / "plain"
    for k in range(2):
        (folder).mkdir(exist_ok=True)
        Image.new("L", (8, 8), k).save(folder / f"{k}.png")
    done = subprocess.run(
        [sys.executable, "train_ddpm.py", "--class-conditional", "--dataset", str(folder),
         "--resolution=8", "--output-dir", str(tmp_path / "r")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "--dataset: the dataset has no class labels" in done.stderr
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        parse_config(train_ddpm.DDPMConfig, ["--label-dropout=1"])
    assert "--label-dropout must be in [0, 1), got 1.0" in capsys.readouterr().err
