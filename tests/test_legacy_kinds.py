"""Folders written before kinds became packages and conditioning a value (96c970b) still load,
sample the same images, and resume with this code.

tests/data/legacy-96c970b/ holds a class-conditional DDPM DiT, a class-conditional EDM UNet and
a latent DDPM UNet (with its tiny VAE), as their users have them: the export, the latest
checkpoint, config.yaml and metrics.jsonl (README.txt says how they were made), and
`expected_samples.npz`: the images sample.py drew from them at 96c970b, per case of
`expected_cases.json` (default samplers, other samplers, guidance, churn, raw weights).
Everything is copied to a temporary folder first; nothing here writes into tests/data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import fresh_accelerate_state

import sample
import train_ddpm
from ddp_utils.config import parse_config
from diffusion.loading import load_for_sampling

REPO = Path(__file__).resolve().parents[1]
FROZEN = REPO / "tests" / "data" / "legacy-96c970b"
CASES: dict[str, list[str]] = json.loads((FROZEN / "expected_cases.json").read_text())
# The commands of make_runs.sh, but --max-steps and --output-dir (a resume may change them).
# The presets and the VAE are given by their paths from the repository root, as recorded.
L = "tests/data/legacy-96c970b"
COMMON = [
    "--max-images=32", "--batch-size=8", "--checkpoint-every=2", "--sample-every=0",
    "--num-sample-images=4", "--sample-steps=2", "--report-to=none",
]  # fmt: skip
RUN_FLAGS = {
    "ddpm-dit-classes": [
        "--resolution=8", "--backbone=dit", f"--preset={L}/tiny-dit.json", "--class-conditional",
    ],
    "edm-classes": [
        "--resolution=8", f"--preset={L}/tiny-unet.json", "--objective=edm", "--class-conditional",
    ],
    "latent-ddpm": ["--resolution=16", f"--preset={L}/tiny-unet.json", f"--vae={L}/vae"],
}  # fmt: skip
TASKS = {"ddpm-dit-classes": "ddpm", "edm-classes": "edm", "latent-ddpm": "ddpm"}


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the frozen runs (~1 MB), shared by the sampling tests (read only)."""
    return Path(shutil.copytree(FROZEN, tmp_path_factory.mktemp("frozen") / "legacy"))


def same_images(ours: np.ndarray, theirs: np.ndarray) -> bool:
    """The same uint8 images, up to a rounding step on a rare pixel (another CPU's float
    summation order may move a value across a rounding boundary; a changed sampler, guidance
    or seed moves most pixels by many steps)."""
    if ours.shape != theirs.shape:
        return False
    difference = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    return difference.max() <= 1 and (difference > 0).mean() <= 0.01


def test_frozen_folders_sample_the_images_they_sampled_when_written(
    frozen: Path, tmp_path: Path
) -> None:
    with np.load(FROZEN / "expected_samples.npz") as npz:
        expected = {name: npz[name] for name in npz.files}
    assert sorted(expected) == sorted(CASES)
    for name, (source, *flags) in CASES.items():
        fresh_accelerate_state()
        out = tmp_path / name.replace("/", "_")
        argv = [str(frozen / source), f"--output-dir={out}", "--num-samples=4", "--num-steps=3"]
        sample.sample(parse_config(sample.SampleConfig, [*argv, *flags]))
        with np.load(out / "samples.npz") as npz:
            images = npz["arr_0"]
        assert images.std() > 0, name
        assert same_images(images, expected[name]), name


@pytest.mark.parametrize("name", sorted(RUN_FLAGS))
def test_frozen_runs_resume_with_the_same_command(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The same command with a larger --max-steps goes on from checkpoint-4 and exports."""
    run = Path(shutil.copytree(FROZEN / name, tmp_path / name))
    monkeypatch.chdir(REPO)  # the presets and the VAE are relative to the repo root
    fresh_accelerate_state()
    capsys.readouterr()
    train_ddpm.main([*COMMON, *RUN_FLAGS[name], f"--output-dir={run}", "--max-steps=6"])
    log = capsys.readouterr().out
    assert "resumed from" in log and "checkpoint-4 (step 4)" in log, log[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    assert state["step"] == 6 and state["task"] == TASKS[name]
    loaded = load_for_sampling(run)
    assert loaded.source == run / "pipeline" and loaded.task == TASKS[name]
    assert loaded.num_classes == (0 if name == "latent-ddpm" else 10)
