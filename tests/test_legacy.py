"""Folders written before the model refactor (58780a2: diffusion/models.py, the shipped
ddpm_pipeline.py and edm_pipeline.py) still load, sample and resume with this code.

tests/data/legacy-58780a2/ holds what users of that code have: exports, the latest checkpoint
of each run and its run directory (its README.txt says how they were made). They are copied
to a temporary folder before anything runs; nothing here writes into tests/data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_runs import fresh_accelerate_state

import sample
import train_ddpm
from ddp_utils.config import parse_config
from diffusion.loading import load_for_sampling
from diffusion.sampling import sample_seed

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy-58780a2"
# The checkpoints record --preset as given, relative to the repository root: a resume must
# give the same string from there.
PRESET = "tests/data/legacy-58780a2/tiny-unet.json"
# The command that made the three train_ddpm.py runs (README.txt), but --max-steps and
# --output-dir, which a resume may change.
OLD_FLAGS = [
    "--resolution=8", "--max-images=32", "--batch-size=8", f"--preset={PRESET}",
    "--checkpoint-every=2", "--sample-every=0", "--num-sample-images=4", "--sample-steps=2",
    "--report-to=none",
]  # fmt: skip
RUN_FLAGS = {
    "ddpm": [],
    "ddpm-class-conditional": ["--class-conditional"],
    "edm": ["--objective=edm"],
}
DIGITS = [str(d) for d in range(10)]
# What each old folder must load as: task, network class, classes, exported guidance, value range.
EXPECTED = {
    "ddpm": ("ddpm", "UNet2DModel", None, 1.0, (-1.0, 1.0)),
    "ddpm-class-conditional": ("ddpm", "UNet2DModel", DIGITS, 1.5, (-1.0, 1.0)),
    "edm": ("edm", "UNet2DModel", None, 1.0, (-1.0, 1.0)),
    "basic": ("basic", "BasicUNet", None, 1.0, (0.0, 1.0)),
}


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A private copy of the frozen runs (~2 MB)."""
    return Path(shutil.copytree(LEGACY, tmp_path / "legacy", symlinks=True))


def run_sample(model: Path, out: Path, *flags: str) -> tuple[np.ndarray, Any, dict[str, Any]]:
    """sample.py in this process: (images, labels or None, sample_info.json)."""
    fresh_accelerate_state()
    sample.sample(parse_config(sample.SampleConfig, [str(model), f"--output-dir={out}", *flags]))
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["labels"] if "labels" in npz else None
    return images, labels, json.loads((out / "sample_info.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_exports_checkpoints_and_run_dirs_load_for_sampling(legacy: Path, name: str) -> None:
    task, network, classes, guidance, value_range = EXPECTED[name]
    run = legacy / name
    export = run / ("model" if name == "basic" else "pipeline")
    sources = [export, run] + sorted((run / "checkpoints").glob("checkpoint-*"))
    assert len(sources) == (2 if name == "basic" else 3)  # the basic run keeps no checkpoint
    for source in sources:
        loaded = load_for_sampling(source)
        assert (loaded.task, type(loaded.model).__name__) == (task, network), source
        assert (loaded.class_names, loaded.guidance_scale) == (classes, guidance), source
        assert tuple(loaded.value_range) == value_range, source
        assert (loaded.channels, loaded.resolution) == (1, 8), source
    assert load_for_sampling(run).source == export  # a run directory means its export


def test_old_basic_export_samples(legacy: Path, tmp_path: Path) -> None:
    images, labels, info = run_sample(legacy / "basic" / "model", tmp_path / "a",
                                      "--num-samples=3", "--num-steps=2")  # fmt: skip
    assert images.shape == (3, 8, 8, 1) and images.std() > 0 and labels is None
    assert info["task"] == "basic" and info["num_steps"] == 2
    again, _, _ = run_sample(legacy / "basic", tmp_path / "b", "--num-samples=3", "--num-steps=2")
    assert np.array_equal(images, again)


@pytest.mark.parametrize("name", sorted(RUN_FLAGS))
def test_old_pipelines_and_their_checkpoints_sample_the_same_images(
    legacy: Path, tmp_path: Path, name: str
) -> None:
    """The export holds the weights of checkpoint-4 (EMA in unet/, raw in unet_raw/): both
    sources give the same images, per weights, with each kind's default sampler."""
    run = legacy / name
    sources = {"pipeline": run / "pipeline", "checkpoint": run / "checkpoints" / "checkpoint-4"}
    flags = ("--num-samples=3", "--num-steps=2")
    results = {
        (source, weights): run_sample(
            path, tmp_path / source / weights, *flags, f"--weights={weights}"
        )
        for source, path in sources.items()
        for weights in ("ema", "raw")
    }
    for weights in ("ema", "raw"):
        ours, theirs = results["pipeline", weights], results["checkpoint", weights]
        assert np.array_equal(ours[0], theirs[0]), weights
        assert ours[0].shape == (3, 8, 8, 1) and ours[0].std() > 0
    # (After 4 steps EMA and raw weights are too close to draw other uint8 images: compare them.)
    tensors = {
        (source, weights): load_for_sampling(path, weights).model.state_dict()
        for source, path in sources.items()
        for weights in ("ema", "raw")
    }
    for weights in ("ema", "raw"):
        ours, theirs = tensors["pipeline", weights], tensors["checkpoint", weights]
        assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    ema, raw = tensors["pipeline", "ema"], tensors["pipeline", "raw"]
    assert not all(ema[k].equal(raw[k]) for k in ema)
    images, labels, info = results["pipeline", "ema"]
    task = EXPECTED[name][0]
    assert info["task"] == task
    assert info["scheduler"] == {"ddpm": "ddim", "edm": "edm-heun"}[task]
    if name == "ddpm-class-conditional":
        assert labels.tolist() == [0, 1, 2]  # sample k: class k mod 10
        assert info["class_names"] == DIGITS and info["guidance_scale"] == 1.5
        chosen = run_sample(run / "pipeline", tmp_path / "chosen", *flags, "--class-labels=3,7")
        assert chosen[1].tolist() == [3, 7, 3]
        assert not np.array_equal(chosen[0], images)
    else:
        assert labels is None


# diffusers alone: every module of the toolkit blocked, the repo off sys.path; the classes of
# the conditional and EDM exports come from their own (old) pipeline.py.
DIFFUSERS_ALONE = """
import json, sys
from importlib.abc import MetaPathFinder

OURS = {"ddp_utils", "diffusion", "evaluation", "sample", "train_ddpm", "train_basic", "tests"}


class BlockToolkit(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OURS:
            raise ImportError(f"the toolkit's module {name} must not be needed")
        return None


sys.meta_path.insert(0, BlockToolkit())
sys.path = [p for p in sys.path if p not in ("", @REPO@)]
import numpy as np, torch
from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline

root, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
seeds, labels = json.loads(sys.argv[4]), json.loads(sys.argv[5])  # labels: class names


def generators():
    return [torch.Generator().manual_seed(s) for s in seeds]


def custom(name, cls):
    pipe = DiffusionPipeline.from_pretrained(f"{root}/{name}/pipeline", trust_remote_code=True,
                                             use_safetensors=True)
    assert type(pipe).__name__ == cls, type(pipe)
    assert type(pipe).__module__.startswith("diffusers_modules"), type(pipe).__module__
    return pipe


# A stock DDPMPipeline folder: diffusers' DDIMPipeline takes it as it is.
pipe = DDIMPipeline.from_pretrained(f"{root}/ddpm/pipeline", use_safetensors=True)
np.save(f"{out}/ddpm.npy", pipe(batch_size=len(seeds), generator=generators(), eta=0.0,
                                num_inference_steps=steps, output_type="np").images)
pipe = custom("ddpm-class-conditional", "GuidedDDPMPipeline")
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
print("guidance", pipe.config.guidance_scale, "classes", pipe.config.class_names)
# w = 1: its pipeline.py guides as this toolkit did then (no projection of the clean image).
np.save(f"{out}/ddpm-class-conditional.npy", pipe(class_labels=labels, generator=generators(),
        num_inference_steps=steps, guidance_scale=1.0, output_type="np").images)
pipe = custom("edm", "EDMPipeline")  # Heun, deterministic
np.save(f"{out}/edm.npy", pipe(batch_size=len(seeds), generator=generators(),
                               num_inference_steps=steps, output_type="np").images)
"""


def test_old_exports_run_in_diffusers_alone_and_give_sample_pys_images(
    legacy: Path, tmp_path: Path
) -> None:
    steps, num = 3, 3
    # sample.py's DDIM with eta 0 is what the DDPM pipelines run with a DDIMScheduler.
    flags = {"ddpm": ["--scheduler=ddim", "--eta=0"], "edm": []}
    # The conditional export unguided: its own pipeline.py keeps the guidance of its time.
    unguided = {"ddpm-class-conditional": ["--guidance-scale=1"]}
    ours = {
        name: run_sample(
            legacy / name / "pipeline",
            tmp_path / name,
            f"--num-samples={num}",
            f"--num-steps={steps}",
            *flags[EXPECTED[name][0]],
            *unguided.get(name, []),
        )
        for name in RUN_FLAGS
    }
    labels = [str(c) for c in ours["ddpm-class-conditional"][1].tolist()]
    seeds = [sample_seed(0, k) for k in range(num)]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", DIFFUSERS_ALONE.replace("@REPO@", repr(str(REPO))), str(legacy),
         str(tmp_path), str(steps), json.dumps(seeds), json.dumps(labels)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"guidance 1.5 classes {DIGITS}" in done.stdout
    for name, (images, _, _) in ours.items():
        theirs = np.round(np.load(tmp_path / f"{name}.npy") * 255)
        assert theirs.shape == images.shape == (num, 8, 8, 1), name
        assert np.abs(theirs - images.astype(np.float64)).max() <= 1, name  # up to rounding


@pytest.mark.parametrize("name", sorted(RUN_FLAGS))
def test_old_runs_resume_with_the_same_command(
    legacy: Path, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The same command with a larger --max-steps goes on from the old checkpoint-4 (no
    checkpoint-2 again: it did not start over), and exports with this code."""
    run = legacy / name
    monkeypatch.chdir(REPO)  # --preset is relative to the repo root, as the run recorded it
    fresh_accelerate_state()
    capsys.readouterr()
    train_ddpm.main([*OLD_FLAGS, *RUN_FLAGS[name], f"--output-dir={run}", "--max-steps=6"])
    log = capsys.readouterr().out
    assert "resumed from" in log and "checkpoint-4 (step 4)" in log, log[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    assert state["step"] == 6 and state["task"] == EXPECTED[name][0]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [4, 6]
    loaded = load_for_sampling(run)
    assert loaded.source == run / "pipeline" and loaded.task == EXPECTED[name][0]
    assert (loaded.class_names, loaded.guidance_scale) == EXPECTED[name][2:4]
