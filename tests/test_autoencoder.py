"""train_autoencoder.py: what a user finds in the run directory, and what is refused.

One tiny trained run (the ae-digits preset at 16x16: 4x4x4 latents, 80 steps on 224 digits,
16 held out) is shared by the tests; it trains in-process, pinned to one thread (this module
fixture runs before conftest's one-thread fixture, and bit-exact comparisons need one).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from scipy.ndimage import gaussian_filter

import train_autoencoder
from ddp_utils.data import hold_out_last, load_image_data
from ddp_utils.errors import InputError
from ddp_utils.tracking import read_metrics
from diffusion.autoencoder.presets import build_autoencoder
from diffusion.autoencoder.quality import SSIM_C1, psnr, ssim
from tests.tiny_runs import fresh_accelerate_state, launch_two_processes

RES = 16
NUM_HOLDOUT = 16
MAX_STEPS = 80
ARGS = [
    f"--resolution={RES}",
    "--max-images=240",
    f"--num-holdout={NUM_HOLDOUT}",
    f"--max-steps={MAX_STEPS}",
    "--batch-size=16",
    "--learning-rate=3e-3",
    "--lr-warmup-steps=5",
    "--log-every=20",
    "--checkpoint-every=40",
    "--sample-every=0",
    "--num-sample-images=8",
    "--report-to=none",
]


def train(run: Path, *extra: str) -> None:
    fresh_accelerate_state()
    train_autoencoder.main([*ARGS, f"--output-dir={run}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The run directory of the shared tiny run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("autoencoder") / "run"
    try:
        train(run)
    finally:
        torch.set_num_threads(previous)
    return run


def held_out_images() -> torch.Tensor:
    """The run's held-out images as floats in [0, 1]: the last 16 of the first 240 digits."""
    data = load_image_data("digits", RES, 1, max_images=240)
    return hold_out_last(data, NUM_HOLDOUT)[1].float() / 255


def test_export_is_a_diffusers_autoencoder_with_the_latent_grid(trained):
    export = trained / "model"
    vae = AutoencoderKL.from_pretrained(export)
    assert type(vae) is AutoencoderKL
    x = held_out_images() * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert posterior.mean.shape == (NUM_HOLDOUT, 4, RES // 4, RES // 4)
        assert vae.decode(posterior.mode()).sample.shape == x.shape
    # The scaling factor, measured at export, brings the training latents to unit std.
    train_x = load_image_data("digits", RES, 1, max_images=240).images[:-NUM_HOLDOUT]
    with torch.no_grad():
        means = vae.encode(train_x.float() / 127.5 - 1).latent_dist.mean
    assert (means * vae.config.scaling_factor).std().item() == pytest.approx(1, rel=1e-3)
    task = json.loads((export / "task.json").read_text())
    assert task == {
        "task": "autoencoder",
        "value_range": [-1.0, 1.0],
        "downsampling_factor": 4,
        "resolution": RES,
    }
    assert (export / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(export.glob("*.bin"))
    checksums = json.loads((export / "checksums.json").read_text())
    assert "reconstruction.json" in json.dumps(checksums)
    card = (export / "README.md").read_text()
    assert "held-out PSNR" in card and "--vae" in card and "sample.py" not in card
    # The grid: a row of 8 held-out inputs over the row of their reconstructions.
    grid = np.asarray(Image.open(export / "samples.png"))
    assert grid.shape[1] > grid.shape[0]  # 8 images wide, 2 high


def test_reconstructions_beat_the_mean_image_on_held_out_digits(trained):
    figures = json.loads((trained / "model" / "reconstruction.json").read_text())
    assert figures["num_images"] == NUM_HOLDOUT
    assert 0 < figures["ssim"] <= 1 and figures["psnr"] > 0
    # A trivial codec: every image decodes to the mean held-out image.
    x = held_out_images()
    baseline = psnr(x, x.mean(0, keepdim=True).expand_as(x)).mean().item()
    assert figures["psnr"] > baseline + 1, (figures, baseline)
    logged = read_metrics(trained / "metrics.jsonl")
    assert [m["step"] for m in logged if "kl" in m] == [20, 40, 60, 80]
    assert logged[-1]["holdout_psnr"] == pytest.approx(figures["psnr"])
    assert logged[0]["reconstruction"] > logged[3]["reconstruction"]  # it learned


def test_rerun_after_a_kill_resumes_bit_exact(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints" / "checkpoint-80")  # killed before its last save
    shutil.rmtree(run / "model")
    capsys.readouterr()
    train(run)
    assert "checkpoint-40 (step 40)" in capsys.readouterr().out  # resumed from there
    first = load_file(trained / "checkpoints" / "checkpoint-80" / "model.safetensors")
    resumed = load_file(run / "checkpoints" / "checkpoint-80" / "model.safetensors")
    assert first.keys() == resumed.keys()
    for name, value in first.items():
        assert torch.equal(resumed[name], value), name
    a = load_file(trained / "model" / "diffusion_pytorch_model.safetensors")
    b = load_file(run / "model" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_two_processes_train_through_ddp(tmp_path):
    """DDP synchronises what forward computed: the loss (reconstruction and KL) comes from one
    call of the training autoencoder's forward. Same held-out images on both ranks."""
    run = tmp_path / "run"
    flags = [f for f in ARGS if not f.startswith(("--max-steps", "--batch-size", "--log-every"))]
    log = launch_two_processes(
        ["train_autoencoder.py", *flags, "--max-steps=2", "--batch-size=8", "--log-every=1",
         f"--output-dir={run}"],
        tmp_path,
    )  # fmt: skip
    assert "per device 8 x 2 processes" in log
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert state["num_processes"] == 2
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 2]
    assert json.loads((run / "model" / "reconstruction.json").read_text())["num_images"] == 16
    AutoencoderKL.from_pretrained(run / "model")


def test_sd_vae_preset_has_the_published_sd_vae_parameter_count():
    with torch.device("meta"):
        vae = build_autoencoder("sd-vae", 256, 3)
    # stabilityai/sd-vae-ft-ema's AutoencoderKL.
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resolution=18"], r"--resolution must be divisible by 4 .* use 16 or 20"),
        (["--preset=sd-vae", "--resolution=36"], r"divisible by 8 .* use 32 or 40"),
        (["--num-holdout=240"], r"--num-holdout: must be between 1 and 239"),
        (["--num-sample-images=32"], r"--num-sample-images \(32\) .* at most --num-holdout"),
        (["--kl-weight=-1"], r"--kl-weight must be >= 0"),
        (["--eval-every=10"], r"--eval-every scores generated samples .* drop it"),
    ],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    try:  # flags checked on their own: argparse's exit 2; against the data: an InputError
        train(run, *flags)
    except SystemExit as exit:
        assert exit.code == 2
        said = capsys.readouterr().err
    except InputError as err:
        said = str(err)
    else:
        pytest.fail(f"{flags} were not refused")
    assert re.search(message, said), said
    assert not run.exists()


def test_sample_py_and_init_from_refuse_the_export_and_say_what_it_is(trained, tmp_path):
    import sample
    import train_ddpm

    for source in (trained / "model", trained, trained / "checkpoints" / "checkpoint-80"):
        with pytest.raises(InputError, match=r"an autoencoder .* --vae <folder>"):
            sample.main([str(source), f"--output-dir={tmp_path / 'samples'}"])
    assert not (tmp_path / "samples").exists()
    fresh_accelerate_state()
    with pytest.raises(InputError, match=r"--init-from: .* an autoencoder .* --vae <folder>"):
        train_ddpm.main(
            [
                f"--init-from={trained / 'model'}",
                f"--output-dir={tmp_path / 'ddpm'}",
                "--resolution=16",
                "--max-images=32",
                "--report-to=none",
            ]
        )
    assert not (tmp_path / "ddpm" / "checkpoints").exists()


def test_held_out_split_is_the_same_in_memory_and_streamed():
    memory = load_image_data("digits", 8, 1, max_images=100)
    stream = load_image_data("digits", 8, 1, max_images=100, data_loading="stream")
    train_m, held_m = hold_out_last(memory, 10)
    train_s, held_s = hold_out_last(stream, 10)
    assert torch.equal(held_m, held_s) and torch.equal(held_m, memory.images[90:])
    assert train_m.num_images == train_s.num_images == 90
    assert torch.equal(train_m.images, memory.images[:90])
    assert train_m.fingerprint != memory.fingerprint  # caches keyed by it never mix the sets


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM as scikit-image computes it (gaussian_weights=True, sigma 1.5,
    use_sample_covariance=False, data_range 1): filtered maps cropped by the window's radius."""

    def blur(z: np.ndarray) -> np.ndarray:
        return gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # an 11-wide window

    mx, my = blur(a), blur(b)
    vx, vy, cxy = blur(a * a) - mx * mx, blur(b * b) - my * my, blur(a * b) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def test_ssim_and_psnr_on_known_cases():
    rng = np.random.default_rng(0)
    a = rng.random((24, 20))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    ta, tb = torch.tensor(a)[None, None], torch.tensor(b)[None, None]
    assert ssim(ta, ta).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(ta, tb).item() == pytest.approx(reference_ssim(a, b), abs=1e-10)
    # Two flat images: only the luminance term is left, (2 m n + C1) / (m^2 + n^2 + C1).
    flat = torch.full((1, 3, 16, 16), 0.25), torch.full((1, 3, 16, 16), 0.75)
    expected = (2 * 0.25 * 0.75 + SSIM_C1) / (0.25**2 + 0.75**2 + SSIM_C1)
    assert ssim(*flat).item() == pytest.approx(expected, rel=1e-9)
    # PSNR: an error of 0.1 everywhere is 20 dB; identical images, infinite.
    assert psnr(ta, ta + 0.1).item() == pytest.approx(20.0)
    assert psnr(ta, ta).item() == float("inf")
