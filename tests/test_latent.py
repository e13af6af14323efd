"""Latent diffusion as a user meets it: `train_ddpm.py --vae` trains on the latents of a frozen
AutoencoderKL (encoded once, cached), its grids, FID, `sample.py` and the export show decoded
images, the export holds the VAE and runs in diffusers (its own DiTPipeline too), and bad
VAEs, mismatched data and changed resumes are refused before anything is written.

The VAE is made here (16x16 digits -> 4x4x4 latents, ~20k parameters), its config without a
scaling_factor, so the run measures one on the data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from PIL import Image
from safetensors.torch import load_file

import sample
import train_ddpm
from ddp_utils.config import parse_config
from ddp_utils.data import (
    LatentBatches,
    LatentData,
    batch_indices,
    latent_cache,
    load_image_data,
    load_latents,
)
from ddp_utils.errors import InputError
from ddp_utils.images import make_grid, upscale
from ddp_utils.run import Run
from ddp_utils.tracking import MIN_PICTURE_SIDE
from diffusion.codecs import load_codec
from diffusion.loading import load_for_sampling
from diffusion.sampling import sample_seed
from tests.tiny_runs import fresh_accelerate_state, launch_two_processes, tiny_preset

REPO = Path(__file__).resolve().parents[1]
TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}
RESOLUTION = 16


def make_vae(folder: Path, in_channels: int = 1, seed: int = 0, scale: bool = False) -> Path:
    """A tiny AutoencoderKL (downsampling 4, 4 latent channels), saved as safetensors; its
    config without scaling_factor unless `scale`."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=RESOLUTION,
    )  # fmt: skip
    vae.save_pretrained(folder, safe_serialization=True)
    if not scale:
        config = json.loads((folder / "config.json").read_text())
        del config["scaling_factor"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def latent_args(out: Path, preset: Path, vae: Path | None, *extra: str) -> list[str]:
    return [
        "--backbone", "dit", "--preset", str(preset), "--class-conditional", "--random-flip",
        "--resolution", str(RESOLUTION), "--max-images", "32", "--max-steps", "4",
        "--batch-size", "4", "--lr-warmup-steps", "1", "--checkpoint-every", "2",
        "--log-every", "1", "--sample-every", "4", "--num-sample-images", "10",
        "--sample-steps", "3", "--report-to", "none", "--output-dir", str(out),
        *(["--vae", str(vae)] if vae is not None else []), *extra,
    ]  # fmt: skip


def train(args: list[str]) -> Run:
    """In-process on one thread (module fixtures run before conftest's one-thread fixture);
    what `train_ddpm.main(args)` does, returning the run."""
    fresh_accelerate_state()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_ddpm.train(parse_config(train_ddpm.DDPMConfig, args))
    finally:
        torch.set_num_threads(previous)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def sample_export(folder: Path, out: Path, *flags: str) -> tuple[np.ndarray, np.ndarray]:
    fresh_accelerate_state()
    sample.sample(parse_config(sample.SampleConfig, [str(folder), f"--output-dir={out}", *flags]))
    with np.load(out / "samples.npz") as npz:
        return npz["arr_0"], npz["labels"] if "labels" in npz.files else None


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("latent")
    (folder / "tiny_dit.json").write_text(json.dumps(TINY_DIT))
    make_vae(folder / "vae")
    return folder


@pytest.fixture(scope="module")
def latent_run_and_caches(root: Path, _private_cache: Path) -> tuple[Path, set[Path]]:
    """A class-conditional DiT on the VAE's latents: 4 steps, flips, FID at the end; and the
    latent caches it wrote (the session's cache also holds those of other test files)."""
    before = set(_private_cache.glob("latents-*/manifest.json"))
    out = root / "run"
    train(latent_args(out, root / "tiny_dit.json", root / "vae", "--eval-every", "4",
                      "--eval-num-samples", "8"))  # fmt: skip
    return out, set(_private_cache.glob("latents-*/manifest.json")) - before


@pytest.fixture(scope="module")
def latent_run(latent_run_and_caches: tuple[Path, set[Path]]) -> Path:
    return latent_run_and_caches[0]


def test_a_latent_run_trains_on_cached_latents_and_shows_decoded_images(
    latent_run_and_caches: tuple[Path, set[Path]],
) -> None:
    latent_run, caches = latent_run_and_caches
    assert len(caches) == 1  # encoded once
    # The grid shows 16x16 images (one class per row), not the 4x4 latents.
    grid = np.asarray(Image.open(latent_run / "samples" / "samples-0000004.png"))
    expected = upscale(make_grid(np.zeros((10, RESOLUTION, RESOLUTION, 1), np.uint8), nrow=1),
                       MIN_PICTURE_SIDE)  # fmt: skip
    assert grid.shape[:2] == expected.shape[:2]
    # The export: the network on the 4x4x4 grid, the VAE beside it, the measured scale recorded.
    pipeline = latent_run / "pipeline"
    index = json.loads((pipeline / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    info = json.loads((pipeline / "task.json").read_text())
    scale = info["latent"]["scaling_factor"]
    assert json.loads((pipeline / "vae" / "config.json").read_text())["scaling_factor"] == scale
    assert scale != 0.18215 and info["resolution"] == RESOLUTION
    transformer = json.loads((pipeline / "transformer" / "config.json").read_text())
    assert (transformer["in_channels"], transformer["sample_size"]) == (4, 4)
    card = (pipeline / "README.md").read_text()
    assert "AutoencoderKL" in card and "DiTPipeline(" in card
    # --eval-every scored decoded samples: best/ is a latent export too.
    assert np.isfinite(json.loads((latent_run / "best" / "fid.json").read_text())["fid"])
    assert (latent_run / "best" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_the_latent_cache_is_mapped_reused_and_rebuilt_when_damaged(root, tmp_path, caplog):
    data = load_image_data("digits", RESOLUTION, 1, max_images=32, cache_dir=tmp_path)
    codec = load_codec(root / "vae")
    first = load_latents(data, codec, True, cache_dir=tmp_path)
    # A folder of float16 .npy files that any process maps (np.load(mmap_mode="r")).
    names = ["flipped_mean", "flipped_std", "mean", "std"]
    assert sorted(p.stem for p in first.folder.glob("*.npy")) == names
    for name in names:
        array = np.load(first.folder / f"{name}.npy", mmap_mode="r")
        assert isinstance(array, np.memmap) and array.dtype == np.float16
        assert array.shape == (32, 4, 4, 4)
    assert isinstance(first.mean, np.memmap) and isinstance(first.flipped_std, np.memmap)

    def no_encoding(images):
        raise AssertionError("encoded again")

    encode, codec.encode = codec.encode, no_encoding
    again = load_latents(data, codec, True, cache_dir=tmp_path)  # mapped, not encoded
    assert isinstance(again.mean, np.memmap) and again.mean.filename == first.mean.filename
    assert np.array_equal(again.mean, first.mean) and again.variance == first.variance
    codec.encode = encode
    expected = np.array(first.mean)
    manifest = first.folder / "manifest.json"
    good = manifest.read_text()
    damages = [
        lambda: (first.folder / "std.npy").write_bytes((first.folder / "std.npy").read_bytes()[:200]),
        lambda: manifest.write_text(good.replace('"shape": [\n    32,', '"shape": [\n    31,')),
        lambda: np.save(first.folder / "mean.npy", np.zeros((32, 4, 4, 4), np.float32)),
    ]  # fmt: skip
    for damage in damages:
        caplog.clear()
        damage()
        rebuilt = load_latents(data, codec, True, cache_dir=tmp_path)
        assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
        assert np.array_equal(rebuilt.mean, expected)
    # Without flips, or in float32, the key differs: another folder.
    plain = load_latents(data, codec, False, cache_dir=tmp_path)
    assert plain.folder != first.folder and plain.flipped_mean is None
    full = load_latents(data, codec, False, cache_dir=tmp_path, dtype="float32")
    assert full.mean.dtype == np.float32 and full.folder != plain.folder


def test_a_streamed_dataset_is_encoded_row_for_row_as_in_memory(
    root, tmp_path, monkeypatch, caplog
) -> None:
    """--data-loading stream: the cache is encoded from the source, decoded by workers as in
    memory (a chunk of source rows with an unreadable file holds an image fewer): the same
    arrays, the unreadable file left out (and named) with its label, every other label on its
    latent's row."""
    monkeypatch.setattr(latent_cache, "ENCODE_ROWS", 4)  # the first chunk holds the bad file
    monkeypatch.setattr(latent_cache, "DECODE_ROWS", 2)  # chunks of two workers' items
    folder = tmp_path / "folder"
    for c in range(2):
        for k in range(5):
            rng = np.random.default_rng(10 * c + k)  # texture: latents that differ per image
            pixels = rng.integers(0, 60, (12, 12)) + 150 * c  # class 1 is the bright one
            (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8), "L").save(folder / f"c{c}" / f"{k}.png")
    (folder / "c0" / "2a.png").write_bytes(b"not a png")  # source row 3: in the first chunk

    def load(mode: str):
        return load_image_data(str(folder), RESOLUTION, 1, data_loading=mode, with_labels=True,
                               cache_dir=tmp_path / mode)  # fmt: skip

    codec = load_codec(root / "vae")
    memory, streamed = load("memory"), load("stream")
    assert streamed.stream is not None and memory.num_skipped == 1
    ours = load_latents(streamed, codec, True, cache_dir=tmp_path / "stream", num_workers=2)
    theirs = load_latents(memory, codec, True, cache_dir=tmp_path / "memory")
    assert "2a.png" in caplog.text and ours.mean.shape == (10, 4, 4, 4)
    for name in latent_cache.array_names(True):
        assert np.array_equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.variance == pytest.approx(theirs.variance, rel=1e-9)
    assert torch.equal(ours.labels, memory.labels)
    assert torch.equal(ours.labels, (memory.images.float().mean(dim=(1, 2, 3)) > 128).long())


def test_a_cache_encoded_in_memory_serves_the_stream(root, tmp_path) -> None:
    """The key does not depend on how the data is loaded: the stream maps the cache the
    in-memory path wrote (every image readable), and encodes nothing."""
    codec = load_codec(root / "vae")
    memory = load_image_data("digits", RESOLUTION, 1, max_images=32, cache_dir=tmp_path,
                             with_labels=True)  # fmt: skip
    first = load_latents(memory, codec, False, cache_dir=tmp_path)

    def no_encoding(images):
        raise AssertionError("encoded again")

    codec.encode = no_encoding
    streamed = load_image_data("digits", RESOLUTION, 1, max_images=32, cache_dir=tmp_path,
                               with_labels=True, data_loading="stream")  # fmt: skip
    again = load_latents(streamed, codec, False, cache_dir=tmp_path)
    assert again.folder == first.folder and np.array_equal(again.mean, first.mean)
    assert torch.equal(again.labels, memory.labels)


def test_the_other_processes_wait_for_the_files_not_at_a_barrier(root, tmp_path, monkeypatch):
    """Encoding ImageNet outlasts a barrier's timeout: a process with no chunk to encode (one
    chunk here, two processes) polls for the finished cache (no collective is called) and
    maps what the writer wrote."""
    monkeypatch.setattr(latent_cache, "WAIT_SECONDS", 0.05)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    data = load_image_data("digits", RESOLUTION, 1, max_images=32, cache_dir=tmp_path)
    codec = load_codec(root / "vae")
    # No wait_for_everyone to call.
    main = SimpleNamespace(is_local_main_process=True, local_process_index=0)
    other = SimpleNamespace(is_local_main_process=False, local_process_index=1)
    writer = threading.Timer(0.3, load_latents, (data, codec, False, main), {"cache_dir": tmp_path})
    writer.start()
    waited = load_latents(data, codec, False, other, cache_dir=tmp_path)
    writer.join()
    written = load_latents(data, codec, False, cache_dir=tmp_path)
    assert waited.folder == written.folder and np.array_equal(waited.mean, written.mean)


def test_float16_latents_give_the_float32_samples_up_to_rounding(root, tmp_path) -> None:
    """float16 keeps 11 significant bits: each of mean and std is within 2^-11 of itself
    (2^-24 absolute below 2^-14, the subnormals), so z = mean + std * eps is within
    2^-11 (|mean| + std |eps|). Against the latents' spread: 1.9e-3 at worst here (this
    untrained VAE's std is ~1 and |eps| reaches ~4), 1.5e-4 on average."""
    data = load_image_data("digits", RESOLUTION, 1, max_images=32, cache_dir=tmp_path)
    codec = load_codec(root / "vae")
    half = load_latents(data, codec, False, cache_dir=tmp_path)
    full = load_latents(data, codec, False, cache_dir=tmp_path, dtype="float32")
    eps = np.random.default_rng(0).standard_normal(full.mean.shape)
    z_full = full.mean + full.std * eps
    error = np.abs(half.mean.astype(np.float64) + half.std.astype(np.float64) * eps - z_full)
    bound = 2**-11 * (np.abs(full.mean) + full.std * np.abs(eps)) + 2**-24 * (1 + np.abs(eps))
    assert (error <= bound).all()
    spread = np.sqrt(full.variance)
    assert error.max() / spread < 2.5e-3 and error.mean() / spread < 2e-4
    assert half.variance == full.variance  # measured on the float32 encodings


def test_latent_batches_gather_the_stateless_order_and_split_it_across_ranks() -> None:
    """Rows gathered on the host follow `batch_indices`; two ranks' batches of a step are the
    one-process batch cut in two (std 0: z is the mean itself)."""
    mean = np.arange(10 * 4, dtype=np.float16).reshape(10, 4, 1, 1)
    labels = torch.arange(10) % 3
    latents = LatentData(mean, np.zeros_like(mean), None, None, Path("unused"), 1.0, labels)

    def source(world: int, rank: int, batch: int) -> LatentBatches:
        accelerator = SimpleNamespace(num_processes=world, process_index=rank,
                                      device=torch.device("cpu"))  # fmt: skip
        return LatentBatches(latents, batch, accelerator, 0, (-1.0, 1.0), False)

    for step in range(4):  # 24 images of a 10-image epoch: crosses epochs
        one = source(1, 0, 6).get(step, torch.Generator().manual_seed(step))
        rows = batch_indices(step, 10, 6, 1, 0, 0).numpy()
        assert torch.equal(one.images, torch.from_numpy(mean[rows].astype(np.float32)))
        assert torch.equal(one.condition["class_labels"], labels[rows])
        parts = [source(2, rank, 3).get(step, torch.Generator()) for rank in range(2)]
        assert torch.equal(torch.cat([part.images for part in parts]), one.images)
        parts_labels = [part.condition["class_labels"] for part in parts]
        assert torch.equal(torch.cat(parts_labels), one.condition["class_labels"])


def test_a_cache_the_disk_cannot_hold_is_refused_before_encoding(root, tmp_path, monkeypatch):
    data = load_image_data("digits", RESOLUTION, 1, max_images=32, cache_dir=tmp_path)
    codec = load_codec(root / "vae")
    needed = 2 * 32 * 4 * 4 * 4 * 2  # mean and std, float16
    monkeypatch.setattr(latent_cache, "disk_free", lambda folder: needed - 1)
    with pytest.raises(
        InputError, match=r"needs 8,192 bytes in .* 8,191 bytes are free: set DDP_DIF"
    ):
        load_latents(data, codec, False, cache_dir=tmp_path / "small")
    assert not list((tmp_path / "small").glob("latents-*"))
    monkeypatch.setattr(latent_cache, "disk_free", lambda folder: needed)
    load_latents(data, codec, False, cache_dir=tmp_path / "small")  # fits exactly


def test_sample_py_decodes_and_does_not_depend_on_the_batch_size(latent_run, tmp_path) -> None:
    flags = ["--num-samples=5", "--num-steps=3", "--guidance-scale=1.5"]
    five, labels = sample_export(latent_run / "pipeline", tmp_path / "b5", *flags, "--batch-size=5")
    two, _ = sample_export(latent_run / "pipeline", tmp_path / "b2", *flags, "--batch-size=2")
    assert five.shape == (5, RESOLUTION, RESOLUTION, 1) and five.dtype == np.uint8
    assert np.array_equal(five, two) and labels.tolist() == [0, 1, 2, 3, 4]
    # A checkpoint of the run samples the same (its VAE read from --vae's folder).
    ckpt, _ = sample_export(latent_run / "checkpoints" / "checkpoint-4", tmp_path / "c", *flags)
    assert np.array_equal(ckpt, five)
    loaded = load_for_sampling(latent_run / "pipeline")
    assert (loaded.channels, loaded.resolution) == (1, RESOLUTION) and loaded.codec is not None


def test_two_processes_sample_the_latent_model_as_one_does(latent_run, tmp_path) -> None:
    flags = ["--num-samples=6", "--batch-size=2", "--num-steps=3"]
    one, _ = sample_export(latent_run / "pipeline", tmp_path / "one", *flags)
    launch_two_processes(["sample.py", str(latent_run / "pipeline"),
                          f"--output-dir={tmp_path / 'two'}", *flags], tmp_path)  # fmt: skip
    with np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.array_equal(two["arr_0"], one)


def test_the_export_runs_in_diffusers_and_reproduces_sample_py(latent_run, tmp_path) -> None:
    """The shipped pipeline (trust_remote_code) at guidance 1.5 and diffusers' own DiTPipeline
    at guidance 1 (where it fits: it guides with class 1000 as "no class"), from the same
    seeds, draw sample.py's images."""
    folder = latent_run / "pipeline"
    flags = ["--num-samples=3", "--num-steps=4", "--scheduler=ddim", "--eta=0"]
    guided, labels = sample_export(folder, tmp_path / "g", *flags, "--guidance-scale=1.5")
    plain, _ = sample_export(folder, tmp_path / "p", *flags, "--guidance-scale=1")
    script = f"""
import sys, numpy as np, torch
sys.path = [p for p in sys.path if p not in ("", "{REPO}")]
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline,
                       DiTTransformer2DModel)
folder = "{folder}"
seeds = {[sample_seed(0, k) for k in range(3)]}
gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, use_safetensors=True)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
ours = pipe(class_labels={labels.tolist()}, guidance_scale=1.5, num_inference_steps=4,
            generator=gens(), output_type="np").images
dit = DiTPipeline(transformer=DiTTransformer2DModel.from_pretrained(folder + "/transformer",
                                                                 use_safetensors=True),
                  vae=AutoencoderKL.from_pretrained(folder + "/vae", use_safetensors=True),
                  scheduler=DDIMScheduler.from_pretrained(folder + "/scheduler"))
stock = dit(class_labels={labels.tolist()}, guidance_scale=1.0, num_inference_steps=4,
            generator=gens(), output_type="np").images
np.save("{tmp_path / "ours.npy"}", ours)
np.save("{tmp_path / "stock.npy"}", stock)
print(type(pipe).__name__, type(pipe.vae).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GuidedDDPMPipeline AutoencoderKL" in done.stdout
    for name, expected in (("ours", guided), ("stock", plain)):
        theirs = np.round(np.load(tmp_path / f"{name}.npy") * 255)
        assert theirs.shape == expected.shape
        assert np.abs(theirs - expected.astype(np.float64)).max() <= 1, name  # up to rounding


def test_a_resumed_latent_run_ends_bit_identical(root: Path, latent_run: Path, tmp_path) -> None:
    """Posterior samples and flips come from each step's seeded generator: a run stopped at
    step 2 and resumed ends with the weights of the run that never stopped."""
    out, preset = tmp_path / "resumed", root / "tiny_dit.json"
    train(latent_args(out, preset, root / "vae", "--max-steps", "2", "--sample-every", "0"))
    train(latent_args(out, preset, root / "vae", "--sample-every", "0"))
    for name in ("model", "ema"):
        ours = load_file(out / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        theirs = load_file(latent_run / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_a_streamed_latent_run_encodes_its_own_cache_and_trains_as_in_memory(
    root: Path, latent_run: Path, tmp_path, monkeypatch
) -> None:
    """--data-loading stream --vae, in a cache of its own: the stream encodes the latents the
    in-memory run did, so a run stopped at step 2 and resumed ends with that run's weights
    (labels and flips included); its grid and FID read the stream's first images."""
    monkeypatch.setenv("DDP_DIFFUSION_CACHE", str(tmp_path / "cache"))
    out, preset = tmp_path / "streamed", root / "tiny_dit.json"
    stream = ("--data-loading", "stream")
    train(
        latent_args(out, preset, root / "vae", *stream, "--max-steps", "2", "--sample-every", "0")
    )
    assert len(list((tmp_path / "cache").glob("latents-*/manifest.json"))) == 1
    assert not list((tmp_path / "cache").glob("images-*"))  # no decoded dataset on disk
    train(latent_args(out, preset, root / "vae", *stream, "--eval-every", "4",
                      "--eval-num-samples", "8"))  # fmt: skip
    assert (out / "samples" / "samples-0000004.png").is_file()
    for name in ("model", "ema"):
        ours = load_file(out / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        theirs = load_file(latent_run / "checkpoints" / "checkpoint-4" / f"{name}.safetensors")
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_resume_refuses_a_vae_the_checkpoint_was_not_trained_with(root, latent_run, tmp_path):
    preset = root / "tiny_dit.json"
    pixels = tmp_path / "pixels"
    train(latent_args(pixels, preset, None, "--max-steps", "2", "--sample-every", "0"))
    before = files_under(pixels)
    with pytest.raises(InputError, match="trained on pixels.*this run gives --vae") as refused:
        train(latent_args(pixels, preset, root / "vae", "--max-steps", "4"))
    assert str(refused.value).startswith("--vae: ") and "--resume none" in str(refused.value)
    assert files_under(pixels) == before
    # The latent run resumed without its VAE, or with another one: refused, nothing written.
    before = files_under(latent_run)
    with pytest.raises(InputError, match="trained on the latents of --vae"):
        train(latent_args(latent_run, preset, None, "--max-steps", "6"))
    other = make_vae(tmp_path / "other_vae", seed=1)
    with pytest.raises(InputError, match="sha256"):
        train(latent_args(latent_run, preset, other, "--max-steps", "6"))
    assert files_under(latent_run) == before


def test_bad_vaes_are_refused_naming_the_fix_before_anything_is_written(root, tmp_path):
    preset = root / "tiny_dit.json"
    not_a_vae = tmp_path / "dit"
    DiTTransformer2DModel(**TINY_DIT, in_channels=4, sample_size=4).save_pretrained(not_a_vae)
    pickled = tmp_path / "pickled"
    make_vae(pickled, scale=True)
    (pickled / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, pickled / "diffusion_pytorch_model.bin")
    colour = make_vae(tmp_path / "rgb", in_channels=3)
    cases = [
        (not_a_vae, [], "holds a DiTTransformer2DModel, not an AutoencoderKL"),
        (pickled, [], "only as a pickle.*Convert it once"),
        (colour, [], "encodes 3-channel images and the data has 1: pass --channels 3"),
        (root / "vae", ["--resolution", "18"], "not a multiple of it: pass --resolution 16"),
        (root / "vae", ["--resolution", "4"], "denoises the VAE's 1x1 latent grid"),
        (tmp_path / "missing", [], "does not exist"),
        ("nobody/no-such-vae", [], "hub is offline here"),
    ]
    for vae, extra, message in cases:
        out = tmp_path / f"run-{Path(vae).name}"
        with pytest.raises(InputError, match=message) as refused:
            train([*latent_args(out, preset, Path(vae)), *extra])
        assert str(refused.value).startswith("--vae: ")
        assert not out.exists(), vae


def test_an_edm_unet_on_latents_exports_a_pipeline_that_decodes(root: Path, tmp_path) -> None:
    """Any objective, any backbone: an unconditional EDM UNet on the latents; its export (the
    VAE byte for byte, the EDMPipeline code) draws sample.py's images in diffusers."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "edm"
    train(["--objective", "edm", "--preset", str(tiny_preset(tmp_path)), "--vae", str(root / "vae"),
           "--resolution", str(RESOLUTION), "--max-images", "32", "--max-steps", "2",
           "--batch-size", "8", "--sample-every", "0", "--num-sample-images", "4",
           "--sample-steps", "2", "--report-to", "none", "--output-dir", str(out)])  # fmt: skip
    pipeline = out / "pipeline"
    vae_bytes = (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (pipeline / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae_bytes
    images, _ = sample_export(pipeline, tmp_path / "s", "--num-samples=2", "--num-steps=2")
    assert images.shape == (2, RESOLUTION, RESOLUTION, 1)
    pipe = DiffusionPipeline.from_pretrained(pipeline, trust_remote_code=True,
                                             use_safetensors=True)  # fmt: skip
    assert type(pipe).__name__ == "EDMPipeline" and pipe.vae is not None
    theirs = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=[torch.Generator().manual_seed(sample_seed(0, k)) for k in range(2)],
                  ).images  # fmt: skip
    assert np.abs(np.round(theirs * 255) - images).max() <= 1
    # sigma_data is the scaled latents' standard deviation: 1 with a measured scale (EDM's
    # 0.5 is for pixels in [-1, 1]); a fine-tune from the export takes the export's.
    scheduler = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["sigma_data"] == 1.0
    tuned = tmp_path / "tuned-with-vae"
    train(["--objective", "edm", "--init-from", str(pipeline), "--vae", str(root / "vae"),
           "--resolution", str(RESOLUTION), "--max-images", "32", "--max-steps", "1",
           "--batch-size", "8", "--sample-every", "0", "--num-sample-images", "2",
           "--sample-steps", "2", "--report-to", "none", "--output-dir", str(tuned)])  # fmt: skip
    assert "sigma_data: 1.0" in (tuned / "config.yaml").read_text()
    # Fine-tuning it needs its VAE: without --vae, refused naming it.
    with pytest.raises(InputError, match="--init-from: .*trained on the latents of --vae"):
        train(["--objective", "edm", "--init-from", str(pipeline), "--resolution",
               str(RESOLUTION), "--max-images", "32", "--max-steps", "1", "--batch-size", "8",
               "--report-to", "none", "--output-dir", str(tmp_path / "tuned")])  # fmt: skip
    assert not (tmp_path / "tuned").exists()


def test_a_hub_id_names_a_vae_through_the_hub_cache(root: Path, tmp_path, monkeypatch) -> None:
    """--vae owner/name: the cached snapshot (offline), here a pipeline repository whose
    AutoencoderKL is its vae/ (as Stable Diffusion's repositories hold theirs)."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / "models--someone--tiny-sd"
    snapshot = storage / "snapshots" / commit
    shutil.copytree(root / "vae", snapshot / "vae")
    (snapshot / "model_index.json").write_text("{}")
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "run"
    train(["--vae", "someone/tiny-sd", "--preset", str(tiny_preset(tmp_path)),
           "--resolution", str(RESOLUTION), "--max-images", "32", "--max-steps", "1",
           "--batch-size", "8", "--sample-every", "0", "--num-sample-images", "2",
           "--sample-steps", "2", "--report-to", "none", "--output-dir", str(out)])  # fmt: skip
    latent = json.loads((out / "pipeline" / "task.json").read_text())["latent"]
    assert latent["vae"] == "someone/tiny-sd"
    assert latent["sha256"] == load_codec(root / "vae").sha256
    # Its checkpoint names the hub id, and sampling it resolves the VAE the same way.
    loaded = load_for_sampling(out / "checkpoints")
    assert loaded.codec.sha256 == latent["sha256"] and loaded.resolution == RESOLUTION
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not in the local cache.*sample the run's export"):
        load_for_sampling(out / "checkpoints")


def test_latent_scale_measure_replaces_the_configs_default(latent_run: Path, tmp_path) -> None:
    """diffusers writes scaling_factor 0.18215 (Stable Diffusion's) into every AutoencoderKL
    config: --latent-scale measure uses 1 / the latents' standard deviation instead."""
    vae = make_vae(tmp_path / "vae", scale=True)
    out = tmp_path / "run"
    train(["--vae", str(vae), "--latent-scale", "measure", "--preset", str(tiny_preset(tmp_path)),
           "--resolution", str(RESOLUTION), "--max-images", "32", "--max-steps", "1",
           "--batch-size", "8", "--sample-every", "0", "--num-sample-images", "2",
           "--sample-steps", "2", "--report-to", "none", "--output-dir", str(out)])  # fmt: skip
    scale = json.loads((out / "pipeline" / "task.json").read_text())["latent"]["scaling_factor"]
    measured = json.loads((latent_run / "pipeline" / "task.json").read_text())["latent"]
    assert scale == pytest.approx(measured["scaling_factor"], rel=1e-6) and scale != 0.18215
    assert json.loads((out / "pipeline" / "vae" / "config.json").read_text())[
        "scaling_factor"
    ] == pytest.approx(scale)


def write_class_folders(folder: Path, per_class: int = 12) -> Path:
    """The first `per_class` digits of 0, 1 and 2 as RGB PNGs in one subfolder per class (an
    image folder as the ImageNet recipe reads one)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(3):
        (folder / str(label)).mkdir(parents=True)
        images = digits.images[digits.target == label][:per_class]
        for k, image in enumerate(images):
            pixels = (image * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").resize((24, 24)).save(
                folder / str(label) / f"{k}.png"
            )
    return folder


def test_the_imagenet_recipe_runs_on_two_processes_and_resumes(root: Path, tmp_path) -> None:
    """recipes/imagenet256_dit_xl2.sh itself, with 2 CPU processes over gloo, an image folder
    of 3 classes and a tiny VAE and DiT in place of ImageNet, sd-vae-ft-ema and DiT-XL/2 (the
    flags the recipe lets a user append): the node's latent cache is encoded once from the
    stream, both processes train on it, and the same command with more steps resumes from the
    last checkpoint and reads the cache instead of encoding again."""
    data = write_class_folders(tmp_path / "images")
    make_vae(tmp_path / "vae3", in_channels=3, scale=True)
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
        "DDP_DIFFUSION_CACHE": str(cache),
        "DATASET": str(data),
        "OUTPUT_DIR": str(tmp_path / "run"),
        "CONFIG": str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
        "ACCELERATE": str(Path(sys.executable).with_name("accelerate")),
    }
    small = [
        "--resolution", "16", "--vae", str(tmp_path / "vae3"), "--backbone", "dit",
        "--preset", str(root / "tiny_dit.json"), "--batch-size", "4",
        "--checkpoint-every", "2", "--sample-every", "0", "--num-sample-images", "4",
        "--sample-steps", "2", "--report-to", "none",
    ]  # fmt: skip
    logs = []
    for max_steps in ("4", "6"):
        proc = subprocess.run(
            ["bash", str(REPO / "recipes" / "imagenet256_dit_xl2.sh"), *small,
             "--max-steps", max_steps],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        logs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, logs[-1][-4000:]
    first, second = logs
    assert "per device 4 x 2 processes x 1 accumulation = global 8" in first
    assert "latents: encoding 36 images once" in first
    assert "latents: encoding" not in second and "resumed from" in second
    assert len(list(cache.glob("latents-*/manifest.json"))) == 1
    run = tmp_path / "run"
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 6
    assert state["latent"]["vae"] == str(tmp_path / "vae3")
    task = json.loads((run / "pipeline" / "task.json").read_text())
    assert task["class_names"] == ["0", "1", "2"]
    assert (run / "pipeline" / "vae" / "config.json").is_file()


def with_channel_statistics(folder: Path, mean: list, std: list) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(latents_mean=mean, latents_std=std, scaling_factor=0.5)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_per_channel_latent_statistics_are_trained_in_and_decoded(root: Path, tmp_path) -> None:
    """A VAE whose config has latents_mean and latents_std (Playground v2.5's kind): batches
    are (x - mean) * scale / std per channel, decoding inverts exactly that, the export and
    task.json carry them, and diffusers' DiTPipeline (which ignores them) is not offered."""
    from diffusion.pipeline_code.core import decode_latents

    mean, std = [0.5, -1.0, 0.0, 2.0], [2.0, 0.5, 1.0, 4.0]
    folder = with_channel_statistics(make_vae(tmp_path / "vae"), mean, std)
    codec = load_codec(folder)
    shift, scale = codec.affine("cpu")
    x = torch.randn(3, 4, 4, 4)
    expected = (x - torch.tensor(mean).view(-1, 1, 1)) * 0.5 / torch.tensor(std).view(-1, 1, 1)
    assert torch.allclose((x - shift) * scale, expected)
    with torch.no_grad():
        direct = codec.vae.decode(x, return_dict=False)[0]
        assert torch.allclose(decode_latents(codec.vae, expected), direct, atol=1e-5)

    out = tmp_path / "run"
    run = train(latent_args(out, root / "tiny_dit.json", folder, "--max-steps", "2",
                            "--checkpoint-every", "2", "--sample-every", "2"))  # fmt: skip
    assert torch.equal(run.latents.shift, shift) and torch.equal(run.latents.scale, scale)
    latent = json.loads((out / "pipeline" / "task.json").read_text())["latent"]
    assert (latent["latents_mean"], latent["latents_std"]) == (mean, std)
    config = json.loads((out / "pipeline" / "vae" / "config.json").read_text())
    assert (config["latents_mean"], config["latents_std"], config["scaling_factor"]) == (
        mean, std, 0.5,
    )  # fmt: skip
    assert "DiTPipeline(" not in (out / "pipeline" / "README.md").read_text()
    # The export and the checkpoint decode a draw alike (both apply the statistics).
    exported = load_for_sampling(out / "pipeline").codec
    resumed = load_for_sampling(out / "checkpoints").codec
    assert exported.latents_mean == resumed.latents_mean == tuple(mean)

    # A scale measured on raw latents would undo the statistics: refused before any work.
    refused = tmp_path / "measure"
    with pytest.raises(InputError, match="normalizes each latent channel.*--latent-scale config"):
        train(latent_args(refused, root / "tiny_dit.json", folder, "--latent-scale", "measure"))
    assert not refused.exists()
    bad = with_channel_statistics(make_vae(tmp_path / "bad"), [0.0] * 3, [1.0] * 3)
    with pytest.raises(InputError, match="3 latents_mean and 3 latents_std values for 4 latent"):
        train(latent_args(tmp_path / "bad-run", root / "tiny_dit.json", bad))
    assert not (tmp_path / "bad-run").exists()


def test_edm_sigma_data_is_kept_by_a_resume_and_by_a_fine_tune(root: Path, tmp_path) -> None:
    """--sigma-data given once (0.7, not the latents' measured 1): the same command without it
    resumes with 0.7 (the checkpoint's), and --init-from the export without it trains with 0.7."""
    out, tuned = tmp_path / "edm", tmp_path / "tuned"

    def edm_args(output_dir: Path, *extra: str) -> list[str]:
        return ["--objective", "edm", "--vae", str(root / "vae"), "--resolution",
                str(RESOLUTION), "--max-images", "32",
                "--batch-size", "8", "--checkpoint-every", "1", "--sample-every", "0",
                "--num-sample-images", "2", "--sample-steps", "2", "--report-to", "none",
                "--output-dir", str(output_dir), *extra]  # fmt: skip

    preset = ["--preset", str(tiny_preset(tmp_path))]
    train(edm_args(out, *preset, "--max-steps", "1", "--sigma-data", "0.7"))
    assert train(edm_args(out, *preset, "--max-steps", "2")).cfg.sigma_data == 0.7  # resumed
    assert train(edm_args(tuned, "--max-steps", "1", "--init-from", str(out / "pipeline"))
                 ).cfg.sigma_data == 0.7  # fmt: skip
    scheduler = json.loads((tuned / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["sigma_data"] == 0.7


def test_a_latent_checkpoint_samples_from_anywhere_and_takes_a_moved_vae(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative --vae is recorded by its absolute path (the checkpoint samples from another
    directory); once the VAE is moved, sample.py --vae names its new place, checked by the
    weights' hash; another VAE, or --vae for an export, is refused."""
    make_vae(tmp_path / "vae")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    train(["--preset", str(tiny_preset(tmp_path)), "--vae", "vae", "--resolution", "16",
           "--max-images", "8", "--max-steps", "1", "--batch-size", "4", "--sample-every", "0",
           "--num-sample-images", "2", "--sample-steps", "2", "--report-to", "none",
           "--output-dir", str(out)])  # fmt: skip
    checkpoint = out / "checkpoints" / "checkpoint-1"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["latent"]["vae"] == str(tmp_path / "vae")
    monkeypatch.chdir(REPO)
    first, _ = sample_export(checkpoint, tmp_path / "a", "--num-samples=2", "--num-steps=2")
    (tmp_path / "vae").rename(tmp_path / "moved")
    with pytest.raises(InputError, match="give sample.py --vae with the autoencoder"):
        sample_export(checkpoint, tmp_path / "b", "--num-samples=2", "--num-steps=2")
    moved, _ = sample_export(checkpoint, tmp_path / "c", "--num-samples=2", "--num-steps=2",
                             f"--vae={tmp_path / 'moved'}")  # fmt: skip
    assert np.array_equal(first, moved)
    make_vae(tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="the VAE changed since training"):
        sample_export(checkpoint, tmp_path / "d", "--num-samples=2", f"--vae={tmp_path / 'other'}")
    with pytest.raises(InputError, match="--vae applies to checkpoints of latent runs"):
        sample_export(out / "pipeline", tmp_path / "e", "--num-samples=2",
                      f"--vae={tmp_path / 'moved'}")  # fmt: skip


def test_a_missing_vae_is_named_as_a_vae(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="holding an AutoencoderKL") as refused:
        train(["--vae", str(tmp_path / "no-such-vae"), "--max-steps", "1", "--report-to", "none",
               "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert "UNet2DModel folder, a checkpoint" not in str(refused.value)
    assert not (tmp_path / "run").exists()
